"""The event decoder: hostile bytes become dead letters with the right reason, good events become
typed events with the timestamp as float epoch seconds."""

from __future__ import annotations

import math

import msgspec
import pytest

from monitor.detectors import ModelBatch
from monitor.events import REASONS, EventDecoder

MAX_FEATURES = 4
MAX_BYTES = 4096


@pytest.fixture
def decoder() -> EventDecoder:
    return EventDecoder(max_features=MAX_FEATURES, max_message_bytes=MAX_BYTES)


def message(*extra: bytes, ts: bytes = b"1764000000") -> bytes:
    """A valid event's JSON with ``extra`` members appended (written by hand, so any bytes fit)."""
    return b'{"event_id": "e1", "ts": ' + ts + b', "model": "fraud"' + b"".join(b", " + e for e in extra) + b"}"


def feature_values(event) -> object:
    """The event's features as Python values. The decoder may keep them parsed or as validated raw
    JSON for the detectors to parse per batch; either way the values must survive unchanged."""
    features = event.features
    if isinstance(features, msgspec.Raw):
        return msgspec.json.decode(bytes(features)) if features else None
    return features


# raw message -> the dead-letter reason it must get
HOSTILE = {
    "over the size limit": (message(b'"pad": "' + b"a" * MAX_BYTES + b'"'), "message_too_large"),
    "invalid utf-8 in a string": (b'{"event_id": "\xff\xfe", "ts": 1, "model": "fraud"}', "invalid_utf8"),
    "invalid utf-8 outside strings": (message() + b"\xff", "invalid_utf8"),
    "utf-8 encoded surrogate": (b'{"event_id": "\xed\xa0\x80", "ts": 1, "model": "fraud"}', "invalid_utf8"),
    "not json": (b"not json at all", "invalid_json"),
    "truncated object": (b'{"event_id": "e1", "ts": 1, ', "invalid_json"),
    "trailing garbage": (message() + b" trailing", "invalid_json"),
    "lone surrogate escape": (b'{"event_id": "\\ud800", "ts": 1, "model": "fraud"}', "invalid_json"),
    "NaN literal": (message(b'"confidence": NaN'), "non_finite_number"),
    "Infinity literal": (message(b'"latency_ms": Infinity'), "non_finite_number"),
    "-Infinity literal": (message(b'"cpu_ms": -Infinity'), "non_finite_number"),
    "1e999 in a float field": (message(b'"latency_ms": 1e999'), "non_finite_number"),
    "-1e999 in a feature": (message(b'"features": [1, -1e999]'), "non_finite_number"),
    "1e999 as the timestamp": (b'{"event_id": "e1", "ts": 1e999, "model": "fraud"}', "non_finite_number"),
    "array": (b"[1, 2, 3]", "not_an_object"),
    "string": (b'"fraud"', "not_an_object"),
    "number": (b"42", "not_an_object"),
    "null": (b"null", "not_an_object"),
    "no event_id": (b'{"ts": 1, "model": "fraud"}', "missing_field"),
    "no ts": (b'{"event_id": "e1", "model": "fraud"}', "missing_field"),
    "no model": (b'{"event_id": "e1", "ts": 1}', "missing_field"),
    "string where a number belongs": (message(b'"latency_ms": "slow"'), "wrong_type"),
    "numeric string as confidence": (message(b'"confidence": "0.9"'), "wrong_type"),
    "number as event_id": (b'{"event_id": 7, "ts": 1, "model": "fraud"}', "wrong_type"),
    "boolean feature": (message(b'"features": [true]'), "wrong_type"),
    "object as prediction": (message(b'"prediction": {"class": 1}'), "wrong_type"),
    "confidence 1.5": (message(b'"confidence": 1.5'), "out_of_range"),
    "probability -0.1": (message(b'"probabilities": [0.6, -0.1]'), "out_of_range"),
    "negative latency": (message(b'"latency_ms": -3'), "out_of_range"),
    "empty event_id": (b'{"event_id": "", "ts": 1, "model": "fraud"}', "out_of_range"),
    "model name over max_string_chars": (b'{"event_id": "e1", "ts": 1, "model": "' + b"m" * 513 + b'"}', "out_of_range"),
    "too many features (list)": (message(b'"features": [1, 2, 3, 4, 5]'), "too_many_features"),
    "too many features (object)": (message(b'"features": {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}'),
                                   "too_many_features"),
    "ts a word": (message(ts=b'"yesterday"'), "invalid_timestamp"),
    "ts a date without time": (message(ts=b'"2025-11-24"'), "invalid_timestamp"),
    "ts a boolean": (message(ts=b"true"), "invalid_timestamp"),
    "ts null": (message(ts=b"null"), "invalid_timestamp"),
    "empty bytes": (b"", "empty_message"),
    "tombstone (None)": (None, "empty_message"),
}


@pytest.mark.parametrize("raw, reason", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_message_becomes_a_dead_letter_with_its_reason(decoder, raw, reason):
    result = decoder.decode(raw)
    assert isinstance(result, tuple), f"decoded into an event: {result!r}"
    got, error = result
    assert got == reason, error
    assert isinstance(error, str) and error


def test_the_table_covers_every_reason():
    # processing_failed is not a decoder verdict: the pipeline gives it (tests/test_pipeline.py)
    assert {reason for _, reason in HOSTILE.values()} == set(REASONS) - {"processing_failed"}


@pytest.mark.parametrize("ts, expected", [
    (b"1764000000.25", 1_764_000_000.25),
    (b"1764000000", 1_764_000_000.0),
    (b'"2025-11-24T16:00:00Z"', 1_764_000_000.0),
    (b'"2025-11-24T16:00:00.250Z"', 1_764_000_000.25),
    (b'"2025-11-24T18:00:00+02:00"', 1_764_000_000.0),
    (b'"2025-11-24T11:00:00-05:00"', 1_764_000_000.0),
    (b'"2025-11-24T16:00:00"', 1_764_000_000.0),  # naive: read as UTC
], ids=["epoch float", "epoch int", "rfc3339 Z", "rfc3339 fraction", "offset +02:00", "offset -05:00", "naive"])
def test_timestamp_becomes_float_epoch_seconds(decoder, ts, expected):
    event = decoder.decode(message(ts=ts))
    assert event.ts.__class__ is float
    assert event.ts == pytest.approx(expected, abs=1e-6)


def test_features_as_a_list(decoder):
    event = decoder.decode(message(b'"features": [0.5, -2, 3e10, 4]'))
    assert feature_values(event) == [0.5, -2.0, 3e10, 4.0]


def test_features_as_an_object(decoder):
    event = decoder.decode(message(b'"features": {"amount": 120.5, "age": 31}'))
    assert feature_values(event) == {"amount": 120.5, "age": 31.0}


def test_all_documented_fields_are_kept(decoder):
    event = decoder.decode(message(
        b'"model_version": "v3", "client_id": "c9", "prediction": "fraud", "probabilities": [0.2, 0.8]',
        b'"confidence": 0.8, "label": 1, "latency_ms": 12.5, "cpu_ms": 3, "memory_mb": 128',
        b'"input_bytes": 2048, "output_tokens": 0, "status": "ok", "labels": {"region": "eu"}'))
    assert (event.event_id, event.model, event.model_version, event.client_id) == ("e1", "fraud", "v3", "c9")
    assert (event.prediction, event.probabilities, event.confidence, event.label) == ("fraud", [0.2, 0.8], 0.8, 1)
    assert (event.latency_ms, event.cpu_ms, event.memory_mb) == (12.5, 3.0, 128.0)
    assert (event.input_bytes, event.output_tokens, event.status, event.labels) == (2048.0, 0.0, "ok", {"region": "eu"})


def test_unknown_fields_are_ignored(decoder):
    event = decoder.decode(message(b'"trace": {"span": [1, 2, {"deep": null}]}', b'"extra": "yes"'))
    assert event.model == "fraud"
    assert not hasattr(event, "trace") and not hasattr(event, "extra")


def test_optional_fields_default_to_none(decoder):
    event = decoder.decode(message())
    assert event.confidence is None and event.probabilities is None and feature_values(event) is None


def test_confidence_defaults_to_the_largest_probability(decoder):
    events = [decoder.decode(message(b'"probabilities": [0.1, 0.7, 0.2]')),
              decoder.decode(message(b'"confidence": 0.55', b'"probabilities": [0.1, 0.9]')),
              decoder.decode(message())]
    batch = ModelBatch("fraud", events, [("t", 0, i) for i in range(3)])
    confidence = batch.confidence
    assert confidence[0] == 0.7  # only probabilities: their max
    assert confidence[1] == 0.55  # an explicit confidence wins
    assert math.isnan(confidence[2])  # neither: NaN


def test_limits_come_from_the_constructor():
    small = EventDecoder(max_features=5, max_message_bytes=80, max_string_chars=8)
    assert feature_values(small.decode(b'{"event_id": "e", "ts": 1, "model": "m", "features": [1, 2, 3, 4, 5]}')) == [
        1, 2, 3, 4, 5]
    assert small.decode(b'{"event_id": "e", "ts": 1, "model": "123456789"}')[0] == "out_of_range"
    assert small.decode(b'{"event_id": "e", "ts": 1, "model": "m", "pad": "' + b"x" * 60 + b'"}')[0] == (
        "message_too_large")


def test_invalid_utf8_error_names_the_offset_in_the_message(decoder):
    raw = b'{"event_id": "e1", "ts": 1, "model": "fraud", "client_id": "okok\xff"}'
    offset = raw.index(b"\xff")
    reason, error = decoder.decode(raw)
    assert reason == "invalid_utf8"
    assert error == f"invalid UTF-8 at byte {offset}"


def test_invalid_utf8_in_an_unknown_field_is_a_dead_letter(decoder):
    result = decoder.decode(message(b'"comment": "caf\xe9"'))
    assert isinstance(result, tuple) and result[0] == "invalid_utf8"


def test_feature_too_large_for_a_float_is_non_finite_even_without_an_exponent(decoder):
    result = decoder.decode(message(b'"features": [1, 1' + b"0" * 400 + b"]"))
    assert isinstance(result, tuple) and result[0] == "non_finite_number"


def test_invalid_utf8_in_a_feature_name_is_a_dead_letter(decoder):
    result = decoder.decode(message(b'"features": {"amount\xff": 1}'))
    assert isinstance(result, tuple) and result[0] == "invalid_utf8"
