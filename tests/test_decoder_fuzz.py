"""The decoder under hostile input: whatever bytes arrive, ``EventDecoder.decode`` returns an event or a
``(reason, error)`` pair and never raises, and decoding a long run of bad messages keeps no memory."""

from __future__ import annotations

import gc
import json
import math
import random
import tracemalloc

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.events import REASONS, EventDecoder

DECODER = EventDecoder()  # the shipped limits: 4096 features, 1 MiB messages, 512-character strings
MAX_BYTES = DECODER.max_message_bytes

FIELDS = ("event_id", "ts", "model", "model_version", "client_id", "features", "prediction", "probabilities",
          "confidence", "label", "latency_ms", "cpu_ms", "memory_mb", "input_bytes", "output_tokens", "status",
          "labels")

# A valid event as (field, JSON token) pairs; mutations replace, drop, repeat or add members.
VALID = (("event_id", b'"e1"'), ("ts", b"1764000000.5"), ("model", b'"fraud"'), ("client_id", b'"c7"'),
         ("features", b"[0.5, 1.5, -2]"), ("prediction", b'"fraud"'), ("probabilities", b"[0.1, 0.9]"),
         ("confidence", b"0.9"), ("latency_ms", b"12.5"), ("labels", b'{"region": "eu"}'))


def _features(n: int) -> bytes:
    return b"[" + b",".join([b"0.5"] * n) + b"]"


def _feature_object(n: int) -> bytes:
    return b"{" + b",".join(b'"f%d": 1' % i for i in range(n)) + b"}"


# Feature vectors on and over limits.max_features (4096), as arrays and as objects.
FEATURES = (_features(4096), _features(4097), _features(60_000), _feature_object(4096), _feature_object(4097))

# Values that are expensive to build or that sit on a limit, built once.
TOKENS = (
    b"NaN", b"-NaN", b"nan", b"Infinity", b"-Infinity", b"inf", b"1e999", b"-1e999", b"1e308", b"-1e308",
    b"1.7976931348623157e308", b"1.7976931348623159e308", b"4.9e-324", b"1e-400", b"-0", b"-0.0", b"0",
    b"1" + b"0" * 400, b"-" + b"9" * 5000, b"0x10", b"01", b"1.", b".5", b"+1", b"1e", b"--1",
    b"true", b"false", b"null", b"True", b"None", b"undefined",
    b'""', b'" "', b'"\\u0000"', b'"\\ud800"', b'"\\udc00\\ud800"', b'"\\ud83d\\ude00"', b'"\\x41"', b'"\\', b'"',
    b'"2025-11-24T16:00:00Z"', b'"2025-11-24T16:00:00"', b'"2025-11-24T16:00:00+14:00"', b'"2025-11-24"',
    b'"0001-01-01T00:00:00+23:59"', b'"9999-12-31T23:59:59-23:59"', b'"0000-01-01T00:00:00Z"',
    b'"2016-12-31T23:59:60Z"', b'"1764000000"', b'"yesterday"',
    b"[]", b"{}", b"[[]]", b'{"": 1}', b"[1,]", b"{,}", b'{"a" 1}',
    b"[" * 100_000 + b"]" * 100_000,  # 100k deep
    b"[" * 100_000,  # 100k deep and never closed
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b'{"a": NaN, "b":' + b"[" * 20_000 + b"]" * 20_000 + b"}",  # NaN next to deep nesting (the json fallback)
    b'"' + b"x" * 513 + b'"', b'"' + b"x" * 300_000 + b'"', b'"' + "é".encode() * 600 + b'"',
    *FEATURES,
    b"[" + b",".join([b'"x"'] * 5000) + b"]", b"[" + b",".join([b"NaN"] * 100) + b"]",
)

# Pieces that JSON-ish text is glued together from.
FRAGMENTS = (
    b"{", b"}", b"[", b"]", b",", b":", b'"', b"\\", b"\\u", b"d800", b"dfff", b" ", b"\n", b"\t", b"\x00",
    b'"event_id"', b'"ts"', b'"model"', b'"features"', b'"confidence"', b'"probabilities"', b'"labels"',
    b'"x"', b'"fraud"', b"1", b"-", b"0.5", b"1e999", b"e", b"E+", b"NaN", b"nan", b"Infinity", b"null",
    b"true", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xef\xbb\xbf", "é".encode(),
    "\U0001F600".encode(), b'"2025-11-24T16:00:00Z"',
)


def hostile_text(rnd: random.Random) -> bytes:
    """A JSON string of random characters, sometimes with raw (invalid UTF-8) surrogates."""
    ranges = ((0x20, 0x7E), (0x20, 0x7E), (0x0, 0x1F), (0x80, 0x7FF), (0x800, 0xFFFF), (0x10000, 0x10FFFF),
              (0xD800, 0xDFFF))
    chars = []
    for _ in range(rnd.randrange(40)):
        low, high = rnd.choice(ranges)
        chars.append(chr(rnd.randint(low, high)))
    text = "".join(chars)
    if rnd.random() < 0.8:  # escaped: lone surrogates arrive as \udXXX
        return json.dumps(text, ensure_ascii=rnd.random() < 0.5).encode("utf-8", "surrogatepass")
    return b'"' + text.encode("utf-8", "surrogatepass") + b'"'


def hostile_value(rnd: random.Random, depth: int = 0) -> bytes:
    kind = rnd.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rnd.choice(TOKENS)
    if kind == 1:
        return str(rnd.choice([0, -1, 1, 2**53 + 1, 2**63, -(2**63) - 1, 2**64, 10 ** rnd.randrange(400)])).encode()
    if kind == 2:
        return f"{rnd.uniform(-10, 10)!r}e{rnd.randrange(-400, 400)}".encode()
    if kind == 3:
        return hostile_text(rnd)
    if kind == 4:  # not a JSON value at all
        if rnd.random() < 0.3:
            return rnd.randbytes(rnd.randrange(1, 12))
        return bytes(rnd.randint(0x21, 0x7E) for _ in range(rnd.randrange(1, 12)))
    if kind == 5:
        return b"[" + b", ".join(hostile_value(rnd, depth + 1) for _ in range(rnd.randrange(5))) + b"]"
    if kind == 6:
        return b"{" + b", ".join(hostile_text(rnd) + b": " + hostile_value(rnd, depth + 1)
                                 for _ in range(rnd.randrange(5))) + b"}"
    return rnd.choice((b"0.5", b"1", b'"ok"', b"null", b"[0.1, 0.9]"))


def hostile_number(rnd: random.Random) -> bytes:
    kind = rnd.randrange(4)
    if kind == 0:
        return str(rnd.choice([0, -1, 2**63, 10 ** rnd.randrange(400), -(10 ** rnd.randrange(400))])).encode()
    if kind == 1:
        return f"{rnd.uniform(-10, 10)!r}e{rnd.randrange(-400, 400)}".encode()
    if kind == 2:
        return b"9" * rnd.randrange(1, 400) + b"." + b"9" * rnd.randrange(0, 5)
    return rnd.choice((b"0.5", b"-0", b"1e308", b"1E309", b"NaN", b"-Infinity", b"01", b"1.", b"+1", b"--1", b"null"))


def hostile_numbers(rnd: random.Random) -> bytes:
    """A feature array (or object) of numbers from ordinary to unrepresentable."""
    numbers = [hostile_number(rnd) for _ in range(rnd.randrange(6))]
    if rnd.random() < 0.2:
        return b"{" + b", ".join(b'"f%d": ' % i + n for i, n in enumerate(numbers)) + b"}"
    return b"[" + b", ".join(numbers) + b"]"


def mutated_event(rnd: random.Random) -> bytes:
    """A valid event with a few members broken, then sometimes broken again at the byte level."""
    members = list(VALID)
    for _ in range(rnd.randint(1, 3)):
        op = rnd.randrange(5)
        if op == 0:  # a known field gets a hostile value
            name = rnd.choice(FIELDS)
            members = [m for m in members if m[0] != name] + [(name, hostile_value(rnd))]
        elif op == 1 and members:  # a field goes missing
            members.pop(rnd.randrange(len(members)))
        elif op == 2:  # an unknown field, maybe with a hostile name
            name = rnd.choice(["extra", "", "ts ", "é", "\x00", "model\ud800"])
            members.append((name, hostile_value(rnd)))
        elif op == 3:  # a repeated key: the last one should win, or the message is rejected
            name = rnd.choice(FIELDS)
            members.append((name, hostile_value(rnd)))
        else:  # features: at or over limits.max_features, or numbers on a float's edges
            value = rnd.choice(FEATURES) if rnd.random() < 0.3 else hostile_numbers(rnd)
            members = [m for m in members if m[0] != "features"] + [("features", value)]
    raw = b"{" + b", ".join(json.dumps(k).encode() + b": " + v for k, v in members) + b"}"
    cut = rnd.random()
    if cut < 0.1 and raw:
        raw = raw[: rnd.randrange(len(raw))]
    elif cut < 0.2 and raw:
        at = rnd.randrange(len(raw))
        raw = raw[:at] + rnd.randbytes(rnd.randint(1, 4)) + raw[at + 1:]
    elif cut < 0.22:  # right on the size limit, one either side
        pad = MAX_BYTES + rnd.choice((-1, 0, 1)) - len(raw) - len(b', "pad": ""')
        if pad >= 0:
            raw = raw[:-1] + b', "pad": "' + b"p" * pad + b'"}'
    return raw


def hostile_message(rnd: random.Random) -> bytes:
    """One hostile message of any kind, from a seeded random (the memory test's source)."""
    kind = rnd.randrange(6)
    if kind == 0:
        return rnd.randbytes(rnd.randrange(300))
    if kind == 1:
        return b"".join(rnd.choice(FRAGMENTS) for _ in range(rnd.randrange(60)))
    if kind == 2:
        return hostile_value(rnd)
    return mutated_event(rnd)


class Message(bytes):
    """Message bytes whose repr stays short: a failing 200 kB example is reported by its two ends."""

    def __repr__(self) -> str:
        if len(self) <= 400:
            return bytes.__repr__(self)
        try:
            self.decode("utf-8")
            utf8 = "valid UTF-8"
        except UnicodeDecodeError as exc:
            utf8 = f"invalid UTF-8 at byte {exc.start}: {bytes(self[max(0, exc.start - 40):exc.start + 40])!r}"
        return f"<{len(self)} bytes, {utf8}: {bytes(self[:160])!r} ... {bytes(self[-80:])!r}>"


HOSTILE = st.one_of(
    st.binary(max_size=512),
    st.text(alphabet=st.one_of(st.characters(), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)),
            max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.lists(st.sampled_from(FRAGMENTS), max_size=60).map(b"".join),
    st.sampled_from(TOKENS),
    st.randoms(use_true_random=False).map(mutated_event),
    st.randoms(use_true_random=False).map(mutated_event),
    st.randoms(use_true_random=False).map(hostile_value),
).map(Message)

EXAMPLES = 10_000
decoded = 0  # messages the property saw in this run


def assert_event_or_dead_letter(raw: bytes) -> None:
    result = DECODER.decode(raw)
    if result.__class__ is tuple:
        assert len(result) == 2
        reason, error = result
        assert reason in REASONS, result
        assert isinstance(error, str) and error, result
    else:
        assert isinstance(result.model, str) and result.model
        assert result.ts.__class__ is float and math.isfinite(result.ts)


def test_decode_never_raises_on_hostile_messages():
    global decoded
    decoded = 0

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.large_base_example, HealthCheck.filter_too_much])
    @given(HOSTILE)
    def decode_is_total(raw: bytes) -> None:
        global decoded
        decoded += 1
        assert_event_or_dead_letter(raw)

    decode_is_total()
    assert decoded >= EXAMPLES, f"hypothesis ran only {decoded} examples"


def test_every_fixed_hostile_token_is_decoded_without_raising():
    for token in TOKENS:
        assert_event_or_dead_letter(token)
        assert_event_or_dead_letter(b'{"event_id": "e", "ts": 1, "model": "m", "features": ' + token + b"}")
        assert_event_or_dead_letter(b'{"event_id": "e", "ts": ' + token + b', "model": "m"}')


def decode_seeded(rnd: random.Random, count: int) -> None:
    for _ in range(count):
        raw = hostile_message(rnd)
        try:
            DECODER.decode(raw)
        except Exception as exc:  # the property test's business, but name the message here too
            raise AssertionError(f"decode raised on {Message(raw)!r}") from exc


def test_memory_stays_bounded_over_20000_hostile_decodes():
    rnd = random.Random(20251124)
    decode_seeded(rnd, 2000)  # warm-up: msgspec's key cache, interned strings, first-use allocations
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        decode_seeded(rnd, 20_000)
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    growth = after - before
    assert growth < 1024 * 1024, f"traced memory grew by {growth / 1e6:.1f} MB over 20,000 decodes"
