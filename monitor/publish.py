"""Where a batch's results go: detections to the detections topic (keyed by model), dead letters to the
dead-letter topic (original bytes, reason in headers), or both to files when the source is a file.

``publish`` returns only when every output is durable: acknowledged by the broker, or written to the
local spool when the broker refuses a record for good (too large, not authorised). It raises
``PublishError`` for failures worth retrying (broker away, timeouts); the daemon then retries the same
batch and commits nothing meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import threading
from pathlib import Path
from typing import IO, Any, Callable

from kafka import KafkaProducer
from kafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError

from monitor.detections import Detection, encode
from monitor.events import DeadLetter
from monitor.pipeline import BatchResult

log = logging.getLogger("inferwatch.publish")
detections_log = logging.getLogger("inferwatch.detections")

# Room left for the record's key, headers and framing under the producer's request size.
_HEADROOM = 64 * 1024
_MAX_KEY_BYTES = 1024
_MAX_ORIGINAL_HEADERS = 32
_MAX_HEADER_BYTES = 1024


def _retriable(exc: BaseException | None) -> bool:
    """Worth another try: the broker is away or slow, not refusing this record for good."""
    return bool(getattr(exc, "retriable", False)) or isinstance(exc, (KafkaTimeoutError, KafkaConnectionError, OSError))


def _describe(exc: BaseException | None) -> str:
    return type(exc).__name__ if exc is None or not str(exc) else f"{type(exc).__name__}: {str(exc)[:200]}"


class PublishError(Exception):
    """The batch's outputs are not all durable yet; retry the batch."""


def dead_letter_headers(letter: DeadLetter, truncated_from: int | None = None) -> list[tuple[str, bytes]]:
    headers = [
        ("inferwatch.reason", letter.reason.encode()),
        ("inferwatch.error", letter.error.encode("utf-8", "replace")[:1000]),
        ("inferwatch.source.topic", letter.topic.encode()),
        ("inferwatch.source.partition", str(letter.partition).encode()),
        ("inferwatch.source.offset", str(letter.offset).encode()),
    ]
    if letter.timestamp_ms is not None:
        headers.append(("inferwatch.source.timestamp_ms", str(letter.timestamp_ms).encode()))
    if truncated_from is not None:
        headers.append(("inferwatch.truncated_from_bytes", str(truncated_from).encode()))
        headers.append(("inferwatch.original_sha256", hashlib.sha256(letter.value or b"").hexdigest().encode()))
    return headers


class Spool:
    """A local append-only JSONL file for outputs the broker refused for good: nothing disappears."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def write(self, kind: str, payload: dict[str, Any], error: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"kind": kind, "error": error, "payload": payload}, sort_keys=True)
        with self._lock, open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()


class KafkaOutputs:
    def __init__(self, producer: KafkaProducer, detections_topic: str, dead_letter_topic: str,
                 spool: Spool, ack_timeout: float = 10.0, max_request_bytes: int = 1_048_576):
        self.producer = producer
        self.detections_topic = detections_topic
        self.dead_letter_topic = dead_letter_topic
        self.spool = spool
        self.ack_timeout = ack_timeout
        self.max_value_bytes = max(1024, max_request_bytes - _HEADROOM)
        self.listeners: list[Callable[[Detection], None]] = []

    def publish(self, result: BatchResult) -> None:
        sent: list[tuple[Any, str, Any]] = []
        outputs: list[tuple[str, Any, dict[str, Any]]] = [
            ("detection", d, {"topic": self.detections_topic, "key": d.model.encode(), "value": encode(d)})
            for d in result.detections]
        for letter in result.dead_letters:
            outputs.append(("dead_letter", letter, self._dead_letter_record(letter)))
        for kind, item, record in outputs:
            try:
                sent.append((self.producer.send(**record), kind, item))
            except (KafkaError, ValueError, TypeError) as exc:
                if _retriable(exc):
                    raise PublishError(f"producing the batch's outputs failed: {_describe(exc)}") from exc
                self._keep(kind, item, exc)  # refused before sending (too large, invalid): keep it locally
        try:
            self.producer.flush(timeout=self.ack_timeout)
        except KafkaError as exc:
            raise PublishError(f"producing the batch's outputs failed: {_describe(exc)}") from exc
        for future, kind, item in sent:
            if not future.is_done:
                raise PublishError("the broker did not acknowledge every output in time")
            if future.failed():
                if _retriable(future.exception):
                    raise PublishError(f"output not acknowledged: {_describe(future.exception)}") from future.exception
                self._keep(kind, item, future.exception)
        announce(result.detections, self.listeners)

    def _dead_letter_record(self, letter: DeadLetter) -> dict[str, Any]:
        """The dead letter as a Kafka record that fits the producer's request size: the original key,
        value and headers, cut (and said so in headers) where they would not fit."""
        key, value, cut_key, cut_value = letter.key, letter.value, None, None
        if key is not None and len(key) > _MAX_KEY_BYTES:
            key, cut_key = key[:_MAX_KEY_BYTES], len(key)
        if value is not None and len(value) > self.max_value_bytes:
            value, cut_value = value[: self.max_value_bytes], len(value)
        # Kafka allows null header values and null key-and-value records; the producer allows neither.
        headers = [(k, b"" if v is None else v) for k, v in list(letter.headers or [])[:_MAX_ORIGINAL_HEADERS]
                   if isinstance(k, str) and len(k) + len(v or b"") <= _MAX_HEADER_BYTES]
        headers += dead_letter_headers(letter, cut_value)
        if key is None and value is None:
            value = b""
            headers.append(("inferwatch.original_value_null", b"1"))
        if cut_key is not None:
            headers.append(("inferwatch.truncated_key_from_bytes", str(cut_key).encode()))
        return {"topic": self.dead_letter_topic, "key": key, "value": value, "headers": headers}

    def _keep(self, kind: str, item: Any, exc: BaseException) -> None:
        log.error("broker refused a %s for good (%s); kept in %s", kind, _describe(exc), self.spool.path)
        payload = item.envelope() if kind == "dead_letter" else json.loads(encode(item))
        try:
            self.spool.write(kind, payload, _describe(exc))
        except OSError as spool_error:  # disk full, not writable: hold the batch rather than lose it
            raise PublishError(f"cannot keep a refused {kind} in {self.spool.path}: {spool_error.strerror}") from None

    def close(self) -> None:
        try:
            self.producer.flush(timeout=self.ack_timeout)
            self.producer.close(timeout=self.ack_timeout)
        except Exception:
            log.exception("closing the producer")


class FileOutputs:
    """Detections as JSON lines to a file or stdout; dead letters as JSON envelopes to a file."""

    def __init__(self, detections: IO[str] | None, dead_letters_path: Path | None):
        self.detections = detections
        self.dead_letters_path = dead_letters_path
        self.listeners: list[Callable[[Detection], None]] = []

    def publish(self, result: BatchResult) -> None:
        if self.detections is not None and result.detections:
            for d in result.detections:
                self.detections.write(encode(d).decode() + "\n")
            self.detections.flush()
        if result.dead_letters and self.dead_letters_path is not None:
            self.dead_letters_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.dead_letters_path, "a", encoding="utf-8") as handle:
                for letter in result.dead_letters:
                    handle.write(json.dumps(letter.envelope(), sort_keys=True) + "\n")
        announce(result.detections, self.listeners)

    def close(self) -> None:
        if self.detections not in (None, sys.stdout):
            self.detections.close()


def announce(detections: list[Detection], listeners: list[Callable[[Detection], None]]) -> None:
    """Log each detection as one JSON line and hand it to listeners (the demo's console, replay)."""
    for d in detections:
        if detections_log.isEnabledFor(logging.INFO):
            detections_log.info("detection", extra={"detection": json.loads(encode(d))})
        for listener in listeners:
            try:
                listener(d)
            except Exception:
                log.exception("a detection listener failed")
