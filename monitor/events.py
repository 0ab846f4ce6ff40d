"""The inference-log event (DESIGN §2): its typed schema, and decoding raw bytes into events or dead letters.

Decoding never raises on bad input. Each message either becomes an ``Event`` or a ``DeadLetter``
that keeps the original bytes, a reason from ``REASONS`` and where the message came from.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Annotated, Any, NamedTuple, Union

import msgspec

_MAX_FLOAT = 1.7976931348623157e308
# msgspec rejects 1e999 (it would be inf) through this range; JSON has no NaN literal at all.
Finite = Annotated[float, msgspec.Meta(ge=-_MAX_FLOAT, le=_MAX_FLOAT)]
Unit = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0.0, le=_MAX_FLOAT)]

REASONS = {
    "message_too_large": "the message is larger than limits.max_message_bytes",
    "invalid_utf8": "the message is not valid UTF-8",
    "invalid_json": "the message is not valid JSON",
    "non_finite_number": "a number is NaN or infinite",
    "not_an_object": "the message is JSON but not an object",
    "missing_field": "a required field (event_id, ts, model) is missing",
    "wrong_type": "a field has the wrong type",
    "out_of_range": "a number or string is outside its allowed range",
    "too_many_features": "features has more dimensions than limits.max_features",
    "invalid_timestamp": "ts is neither epoch seconds nor an RFC 3339 date-time",
    "empty_message": "the message has no value (a tombstone or an empty line)",
}


def event_type(max_features: int = 4096, max_string_chars: int = 512) -> type:
    """The Event struct with the configured limits baked into its schema (so msgspec enforces them)."""
    Str = Annotated[str, msgspec.Meta(min_length=1, max_length=max_string_chars)]
    Features = Union[
        Annotated[list[Finite], msgspec.Meta(max_length=max_features)],
        Annotated[dict[Str, Finite], msgspec.Meta(max_length=max_features)],
        None,
    ]
    Prediction = Union[Finite, Str, Annotated[list[Union[Finite, Str]], msgspec.Meta(max_length=max_features)], None]
    fields = [
        ("event_id", Str),
        ("ts", Union[Finite, dt.datetime]),
        ("model", Str),
        ("model_version", Union[Str, None], None),
        ("client_id", Union[Str, None], None),
        ("features", Features, None),
        ("prediction", Prediction, None),
        ("probabilities", Union[Annotated[list[Unit], msgspec.Meta(max_length=max_features)], None], None),
        ("confidence", Union[Unit, None], None),
        ("label", Union[Finite, Str, None], None),
        ("latency_ms", Union[NonNegative, None], None),
        ("cpu_ms", Union[NonNegative, None], None),
        ("memory_mb", Union[NonNegative, None], None),
        ("input_bytes", Union[NonNegative, None], None),
        ("output_tokens", Union[NonNegative, None], None),
        ("status", Union[Str, None], None),
        ("labels", Union[Annotated[dict[Str, Str], msgspec.Meta(max_length=64)], None], None),
    ]
    return msgspec.defstruct("Event", fields, kw_only=True, omit_defaults=True)


Event = event_type()  # the default-limits type, for tools and tests that build events by hand


class DeadLetter(NamedTuple):
    """A message that could not become an event, with everything needed to find and fix it."""

    reason: str  # a key of REASONS
    error: str  # the decoder's specific complaint, e.g. "Expected `float`, got `str` - at `$.latency_ms`"
    value: bytes | None  # the original bytes, unchanged
    key: bytes | None
    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None

    def envelope(self) -> dict[str, Any]:
        """The JSON form used where there are no Kafka headers (file sources, logs)."""
        import base64

        return {
            "reason": self.reason,
            "error": self.error,
            "source": {"topic": self.topic, "partition": self.partition, "offset": self.offset},
            "timestamp_ms": self.timestamp_ms,
            "key_b64": base64.b64encode(self.key).decode() if self.key is not None else None,
            "value_b64": base64.b64encode(self.value).decode() if self.value is not None else None,
        }


class EventDecoder:
    """Turns raw message bytes into events, enforcing the configured limits.

    >>> decoder = EventDecoder(max_features=2)
    >>> decoder.decode(b'{"event_id": "a", "ts": 1, "model": "m", "features": [1, 2]}').model
    'm'
    >>> decoder.decode(b'{"event_id": "a", "ts": 1, "model": "m", "features": [1, 2, 3]}')
    ('too_many_features', 'Expected `array` of length <= 2 - at `$.features`')
    """

    def __init__(self, max_features: int = 4096, max_message_bytes: int = 1_048_576, max_string_chars: int = 512):
        self.type = event_type(max_features, max_string_chars)
        self.max_message_bytes = max_message_bytes
        self._decoder = msgspec.json.Decoder(self.type)

    def decode(self, raw: bytes | None) -> Any:
        """An Event, or a ``(reason, error)`` pair when the message is bad."""
        if not raw:
            return ("empty_message", "the message value is empty")
        if len(raw) > self.max_message_bytes:
            return ("message_too_large", f"{len(raw)} bytes > limit {self.max_message_bytes}")
        try:
            event = self._decoder.decode(raw)
        except msgspec.ValidationError as exc:
            return classify_validation_error(str(exc))
        except msgspec.DecodeError as exc:
            return classify_decode_error(raw, str(exc))
        except UnicodeDecodeError as exc:
            return ("invalid_utf8", f"invalid UTF-8 at byte {exc.start}")
        except (ValueError, RecursionError, MemoryError) as exc:  # msgspec's guard on nesting depth
            return ("invalid_json", f"{type(exc).__name__}: {exc}"[:200])
        if event.ts.__class__ is not float:
            ts = event.ts
            if ts.tzinfo is None:  # RFC 3339 needs an offset; a naive time is read as UTC
                ts = ts.replace(tzinfo=dt.timezone.utc)
            event.ts = ts.timestamp()
        return event


def classify_validation_error(message: str) -> tuple[str, str]:
    if message.startswith("Object missing required field"):
        return ("missing_field", message)
    if message.startswith("Expected `object`") and " - at " not in message:
        return ("not_an_object", message)
    if "- at `$.ts`" in message:
        if "Number out of range" in message or "<=" in message or ">=" in message:
            return ("non_finite_number", message)
        return ("invalid_timestamp", message)
    if message.startswith("Expected `array` of length <=") and message.endswith("`$.features`"):
        return ("too_many_features", message)
    if message.startswith("Expected `object` of length <=") and message.endswith("`$.features`"):
        return ("too_many_features", message)
    if "Number out of range" in message:
        return ("non_finite_number", message)
    if message.startswith("Expected `float` <=") and str(_MAX_FLOAT) in message:
        return ("non_finite_number", message)
    if message.startswith("Expected `float` >=") and str(-_MAX_FLOAT) in message:
        return ("non_finite_number", message)
    if "<=" in message or ">=" in message or "length" in message:
        return ("out_of_range", message)
    return ("wrong_type", message)


def classify_decode_error(raw: bytes, message: str) -> tuple[str, str]:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return ("invalid_utf8", f"invalid UTF-8 at byte {exc.start}")
    # Python's json.dumps writes NaN/Infinity by default: name that precisely, it is a common producer bug.
    lowered = raw.lower()
    if b"nan" in lowered or b"infinity" in lowered:
        try:
            import json

            json.loads(raw, parse_constant=_reject_constant)
        except _NonFinite:
            return ("non_finite_number", "NaN or Infinity literal (not valid JSON)")
        except (ValueError, RecursionError):
            pass
    return ("invalid_json", message)


class _NonFinite(ValueError):
    pass


def _reject_constant(name: str) -> float:
    raise _NonFinite(name)


def is_finite(value: float) -> bool:
    return math.isfinite(value)
