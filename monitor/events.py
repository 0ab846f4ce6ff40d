"""The inference-log event (DESIGN §2): its typed schema, and decoding raw bytes into events or dead letters.

Decoding never raises on bad input. Each message either becomes an ``Event`` or a ``DeadLetter``
that keeps the original bytes, a reason from ``REASONS`` and where the message came from.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, NamedTuple, Union

import msgspec
import numpy as np

_MAX_FLOAT = 1.7976931348623157e308
# msgspec rejects 1e999 (it would be inf) through this range; JSON has no NaN literal at all.
Finite = Annotated[float, msgspec.Meta(ge=-_MAX_FLOAT, le=_MAX_FLOAT)]
Unit = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0.0, le=_MAX_FLOAT)]
# Epoch seconds from 1970 to 2100: anything else is a producer bug (milliseconds, most often), and one
# event from the far future would otherwise freeze a model's event-time figures.
TS_MAX = 4_102_444_800.0
EpochSeconds = Annotated[float, msgspec.Meta(ge=0.0, le=TS_MAX)]

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
    "processing_failed": "a bug in InferWatch failed on this message (the log has the traceback)",
}


def event_type(max_features: int = 4096, max_string_chars: int = 512) -> type:
    """The Event struct with the configured limits baked into its schema (so msgspec enforces them)."""
    Str = Annotated[str, msgspec.Meta(min_length=1, max_length=max_string_chars)]
    Prediction = Union[Finite, Str, Annotated[list[Union[Finite, Str]], msgspec.Meta(max_length=max_features)], None]
    fields = [
        ("event_id", Str),
        ("ts", Union[EpochSeconds, dt.datetime]),
        ("model", Str),
        ("model_version", Union[Str, None], None),
        ("client_id", Union[Str, None], None),
        # Kept as raw JSON and checked in C by FeatureCheck: parsing 64 floats into Python objects per
        # event would be most of the decode cost, and detectors parse a whole batch at once instead.
        ("features", msgspec.Raw, msgspec.Raw()),
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


def features_type(max_features: int = 4096, max_string_chars: int = 512) -> Any:
    Str = Annotated[str, msgspec.Meta(min_length=1, max_length=max_string_chars)]
    return Union[
        Annotated[list[Finite], msgspec.Meta(max_length=max_features)],
        Annotated[dict[Str, Finite], msgspec.Meta(max_length=max_features)],
        None,
    ]


# Bytes a flat JSON array of plain numbers may contain besides its brackets.
_NUMERIC = b"0123456789.-+, \t\r\n"
# 300 digits in a row may be an integer part too large for a float (> 1.8e308): checked strictly.
# Found by mapping every digit to "0" and searching for 300 zeros: C speed, unlike a regex here.
_DIGITS_TO_ZERO = bytes(0x30 if 0x30 <= i <= 0x39 else i for i in range(256))
_LONG_RUN = b"0" * 300


def _long_digit_run(raw: bytes) -> bool:
    return _LONG_RUN in raw.translate(_DIGITS_TO_ZERO)
# Without exponents and whitespace other than a space: what the batch fast path accepts (an exponent can
# overflow to infinity, so such arrays take the strict path).
_PLAIN_NUMERIC = b"0123456789.-+, "


class FeatureCheck:
    """Validates the raw ``features`` JSON of an event without building Python floats.

    A flat array of numbers is recognised with one ``bytes.translate`` (C speed) and its dimension
    counted by its commas; anything else (objects, exponents that may overflow, strings, nesting) is
    parsed strictly, so its error is as precise as msgspec's. ``None`` means valid.
    """

    def __init__(self, max_features: int, max_string_chars: int):
        self.max_features = max_features
        self._strict = msgspec.json.Decoder(features_type(max_features, max_string_chars))

    def __call__(self, raw: bytes) -> tuple[str, str] | None:
        if raw[:1] == b"[" and raw.translate(None, _NUMERIC) == b"[]" and not _long_digit_run(raw):
            commas = raw.count(b",")
            dims = commas + 1 if commas or raw.strip(b"[] \t\r\n") else 0
            if dims > self.max_features:
                return ("too_many_features", f"Expected `array` of length <= {self.max_features} - at `$.features`")
            return None
        if raw == b"null":
            return None
        try:
            self._strict.decode(raw)
        except msgspec.ValidationError as exc:
            text = str(exc)  # paths are relative to the features value: re-anchor them in the event
            text = text.replace(" - at `$", " - at `$.features", 1) if " - at `$" in text else f"{text} - at `$.features`"
            return classify_validation_error(text)
        except (msgspec.DecodeError, UnicodeDecodeError):
            # Raw JSON passed msgspec's syntax scan; what remains is invalid UTF-8 inside a string.
            return ("invalid_utf8", "invalid UTF-8 in features")
        return None


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
    headers: list[tuple[str, bytes]] | None = None  # the original record's headers, kept

    @classmethod
    def of(cls, record: Any, reason: str, error: str) -> "DeadLetter":
        """The dead letter of a source record (a kafka-python ConsumerRecord or a file record)."""
        return cls(reason, error, record.value, record.key, record.topic, record.partition, record.offset,
                   record.timestamp, getattr(record, "headers", None))

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
            "headers": [[k, None if v is None else base64.b64encode(v).decode()] for k, v in self.headers or []],
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
        self._check_features = FeatureCheck(max_features, max_string_chars)
        self.max_features = max_features

    def decode(self, raw: bytes | None) -> Any:
        """An Event, or a ``(reason, error)`` pair when the message is bad."""
        event = self.decode_unchecked_features(raw)
        if event.__class__ is not tuple and not raw.isascii() and invalid_utf8([raw]):
            return ("invalid_utf8", utf8_error(raw))
        if event.__class__ is not tuple and event.features:
            problem = self._check_features(bytes(event.features))
            if problem is not None:
                return problem
        return event

    def feature_problems(self, events: list[Any]) -> dict[int, tuple[str, str]]:
        """The events of a batch whose ``features`` are invalid, by index: the batch form of the check
        ``decode`` makes per message. One join and one ``translate`` over the whole batch recognise the
        common case (flat arrays of plain numbers, none long enough to pass the dimension limit);
        anything else is checked message by message."""
        raws = [e.features for e in events]
        joined = b"".join(raws)
        if not joined:
            return {}
        present = sum(1 for r in raws if r)
        if (joined.translate(None, _PLAIN_NUMERIC) == b"[]" * present
                and max(map(len, raws)) <= 2 * self.max_features
                and not _long_digit_run(joined)):
            return {}
        check = self._check_features
        problems = {}
        for i, raw in enumerate(raws):
            if raw:
                problem = check(bytes(raw))
                if problem is not None:
                    problems[i] = problem
        return problems

    def decode_unchecked_features(self, raw: bytes | None) -> Any:
        """``decode`` without the features check, for callers that run ``feature_problems`` per batch."""
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
        except UnicodeDecodeError:
            return ("invalid_utf8", utf8_error(raw))
        except (ValueError, RecursionError, MemoryError) as exc:  # msgspec's guard on nesting depth
            return ("invalid_json", f"{type(exc).__name__}: {exc}"[:200])
        if event.ts.__class__ is not float:
            ts = event.ts
            if ts.tzinfo is None:  # RFC 3339 needs an offset; a naive time is read as UTC
                ts = ts.replace(tzinfo=dt.timezone.utc)
            event.ts = ts.timestamp()
            if not 0.0 <= event.ts <= TS_MAX:
                return ("invalid_timestamp", f"{ts.isoformat()} is outside 1970..2100 - at `$.ts`")
        if not event.model.isprintable():  # model names become metric labels and log fields
            return ("out_of_range", "the model name has non-printable characters - at `$.model`")
        return event


def classify_validation_error(message: str) -> tuple[str, str]:
    if message.startswith("Object missing required field"):
        return ("missing_field", message)
    if message.startswith("Expected `object`") and " - at " not in message:
        return ("not_an_object", message)
    if "- at `$.ts`" in message:
        if "Number out of range" in message:
            return ("non_finite_number", message)
        if "<=" in message or ">=" in message:
            return ("invalid_timestamp", f"{message} (epoch seconds from 1970 to 2100 expected; milliseconds?)")
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


def utf8_error(raw: bytes) -> str:
    """Where the first invalid UTF-8 byte of the message is (msgspec counts from the string's start)."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"invalid UTF-8 at byte {exc.start}"
    return "invalid UTF-8"


def invalid_utf8(values: list[bytes | None]) -> set[int]:
    """Indices of messages that are not valid UTF-8 anywhere, unknown fields included (msgspec does not
    check the fields it skips). ASCII batches, the usual case, are cleared by one C-speed test."""
    joined = b"".join(v for v in values if v)
    if joined.isascii():
        return set()
    bad = set()
    for i, v in enumerate(values):
        if v and not v.isascii():
            try:
                v.decode("utf-8")
            except UnicodeDecodeError:
                bad.add(i)
    return bad


def classify_decode_error(raw: bytes, message: str) -> tuple[str, str]:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return ("invalid_utf8", utf8_error(raw))
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


_features_list = msgspec.json.Decoder(list[Union[list[float], dict[str, float], None]])
_features_flat = msgspec.json.Decoder(list[float])


def features_matrix(events: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """The features of ``events`` as one float64 matrix and a mask of the rows that have them.

    Object-form features are laid out in the sorted order of their names. Rows whose dimension differs
    from the batch's most common one are masked out (a model's input has one shape). One msgspec call
    parses the whole batch: the raw arrays were validated at decode time, so joining them is safe.
    """
    raws = [e.features for e in events]
    present = [i for i, r in enumerate(raws) if r and bytes(r) != b"null"]  # Raw never equals bytes
    n = len(events)
    if not present:
        return np.empty((n, 0)), np.zeros(n, dtype=bool)
    chunks = [bytes(raws[i]) for i in present]
    if all(c[:1] == b"[" for c in chunks):
        # Arrays only: when they all have one length, one flat list of numbers parses twice as fast
        # as a list of lists (64 numbers an event are most of the detect stage's parsing).
        commas = {c.count(b",") for c in chunks}
        if len(commas) == 1 and all(c[1:-1].strip() for c in chunks):  # no empty array, "[]" or "[ ]"
            dim = commas.pop() + 1
            flat = _features_flat.decode(b"[" + b",".join(c[1:-1] for c in chunks) + b"]")
            matrix = np.full((n, dim), np.nan)
            mask = np.zeros(n, dtype=bool)
            idx = np.asarray(present)
            matrix[idx] = np.asarray(flat, dtype=np.float64).reshape(len(present), dim)
            mask[idx] = True
            return matrix, mask
    parsed = _features_list.decode(b"[" + b",".join(chunks) + b"]")
    rows = [sorted(v.items()) and [x for _, x in sorted(v.items())] if isinstance(v, dict) else v for v in parsed]
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    dim = int(np.bincount(lengths).argmax())
    matrix = np.full((n, dim), np.nan)
    mask = np.zeros(n, dtype=bool)
    keep = [j for j in range(len(rows)) if lengths[j] == dim]
    if keep and dim:
        idx = np.asarray([present[j] for j in keep])
        matrix[idx] = np.asarray([rows[j] for j in keep], dtype=np.float64)
        mask[idx] = True
    return matrix, mask
