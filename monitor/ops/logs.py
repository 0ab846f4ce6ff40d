"""Logging set-up: one JSON object per line (for log pipelines) or plain text for a terminal."""

from __future__ import annotations

import json
import logging
import sys
import time

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

# Secret values (Kafka passwords, later tokens and webhook URLs) that must never reach a log line,
# whoever logs them: kafka-python prints its whole configuration at DEBUG, for one.
_SECRETS: set[str] = set()


def redact(value: object) -> None:
    """Register a secret: from now on every log line shows it as ***, in the forms a log line can
    carry it (as is, JSON-escaped, repr-escaped)."""
    text = str(value)
    if not text:
        return
    for form in (text, json.dumps(text)[1:-1], json.dumps(text, ensure_ascii=False)[1:-1], repr(text)[1:-1],
                 text.encode("unicode_escape").decode()):
        if form:
            _SECRETS.add(form)


def scrub(text: str) -> str:
    """``text`` with every registered secret shown as ***: for what is stored or shown, not only logged."""
    return _scrub(text)


def _scrub(text: str) -> str:
    for secret in sorted(_SECRETS, key=len, reverse=True):  # longest first: no partial leftovers
        if secret in text:
            text = text.replace(secret, "***")
    return text


class RedactingFormatter(logging.Formatter):
    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return _scrub(self.inner.format(record))


class TextFormatter(logging.Formatter):
    """Plain lines for a terminal; a detection's JSON follows its message so nothing is lost."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        detection = getattr(record, "detection", None)
        return f"{line} {json.dumps(detection)}" if detection is not None else line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + "Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(level: str = "INFO", fmt: str = "json", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(RedactingFormatter(JsonFormatter() if fmt == "json" else TextFormatter()))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # kafka-python logs every reconnect attempt at WARNING/ERROR; the daemon reports outages itself,
    # once. Authentication and TLS failures are let through: they are not outages but mistakes.
    # (A filter on the "kafka" logger would not see its children's records: it sits on the handler.)
    logging.getLogger("kafka").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    if level != "DEBUG":
        handler.addFilter(_quiet_kafka)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def _quiet_kafka(record: logging.LogRecord) -> bool:
    if not record.name.startswith("kafka"):
        return True
    text = record.getMessage().lower()
    return any(word in text for word in ("authentication", "sasl", "ssl", "certificate", "authoriz"))
