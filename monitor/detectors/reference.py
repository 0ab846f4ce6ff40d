"""Reference data named in config: a JSONL (or JSONL.gz) file of inference-log events, or a ``.npy``
matrix of feature vectors.

Detectors that compare the stream with a reference take it from here when ``reference`` is set, and
otherwise learn it from the first ``reference_size`` events of each model. Either way the reference
they build goes into their checkpointed state with its ``identity`` (the file's path and content hash),
so a restart does not learn it again, and a changed file is noticed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from monitor.errors import ConfigError, InferWatchError

log = logging.getLogger("inferwatch.detectors.reference")

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".ndjson", ".npy")


def check_path(path: str) -> str | None:
    """What is wrong with a configured reference path, or None."""
    p = Path(path)
    if not p.is_file():
        return f"no such file: {path}"
    if not p.name.endswith(SUFFIXES):
        return f"expected a JSONL file of events (.jsonl, .jsonl.gz) or a .npy feature matrix, got {p.name}"
    return None


def identity(path: str) -> str:
    """The file's path and a hash of its content: a checkpointed reference is kept only while they match."""
    return f"{os.path.abspath(path)}#{_digest(os.path.abspath(path), os.stat(path).st_mtime_ns)}"


def still_valid(state: dict, path: str | None, model: str) -> bool:
    """Whether a checkpointed detector state was built from the reference now configured (or learnt
    from the stream because that same file could not be used)."""
    wanted = identity(path) if path and check_path(path) is None else "stream"
    if state.get("reference_id", "stream") in (wanted, f"failed:{wanted}"):
        return True
    log.info("%s: the configured reference changed since the checkpoint; building it anew", model)
    return False


def fall_back(logger: logging.Logger, model: str, error: ConfigError, path: str, size: int) -> str:
    """Log that ``path`` cannot be ``model``'s reference; the id the reference learnt from the stream
    instead is kept under (``still_valid`` keeps it while the file stays the same)."""
    logger.error("%s: %s; learning the reference from the first %d events instead", model, error, size)
    return "failed:" + (identity(path) if check_path(path) is None else path)


@lru_cache(maxsize=32)
def _digest(path: str, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def load(path: str, model: str, limit: int) -> Any:
    """The reference of ``model``: a ``ModelBatch`` of the file's first ``limit`` events of that model
    (events of other models are skipped), or for ``.npy`` an (n x d) float matrix. Raises ConfigError
    with the file and what was wrong."""
    problem = check_path(path)
    if problem:
        raise ConfigError(f"reference {path}: {problem}")
    if path.endswith(".npy"):
        return _matrix(path, limit)
    try:
        by_model = _events_by_model(os.path.abspath(path), os.stat(path).st_mtime_ns, limit)
    except (InferWatchError, OSError, EOFError) as exc:  # unreadable, a truncated .gz, ...
        raise ConfigError(f"reference {path}: cannot be read ({exc})") from None
    if model not in by_model:
        seen = ", ".join(sorted(by_model)[:10]) or "none"
        raise ConfigError(f"reference {path}: no events of model {model!r} (models in the file: {seen})")
    from monitor.detectors import ModelBatch

    events, records = by_model[model]
    return ModelBatch(model, events, records)


def _matrix(path: str, limit: int) -> np.ndarray:
    try:
        matrix = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"reference {path}: not a readable .npy array ({exc})") from None
    if matrix.ndim == 1:
        matrix = matrix[:, None]
    if matrix.ndim != 2 or not np.issubdtype(matrix.dtype, np.number):
        raise ConfigError(f"reference {path}: expected a 2-D numeric array (events x features), "
                          f"got shape {matrix.shape} of {matrix.dtype}")
    matrix = np.asarray(matrix[:limit], dtype=np.float64)
    if not np.isfinite(matrix).all():
        raise ConfigError(f"reference {path}: contains NaN or infinite values")
    return matrix


@lru_cache(maxsize=4)
def _events_by_model(path: str, mtime_ns: int, limit: int) -> dict[str, tuple[list[Any], list[Any]]]:
    """The file's first ``limit`` events of each model, with their line numbers: read once for every
    model that takes its reference from the file."""
    from monitor.events import EventDecoder
    from monitor.sources.files import FileSource

    decoder = EventDecoder()
    by_model: dict[str, tuple[list[Any], list[Any]]] = {}
    bad = 0
    for batch in FileSource([path]).batches():
        for record in batch:
            event = decoder.decode(record.value)
            if event.__class__ is tuple:
                bad += 1
                continue
            events, records = by_model.setdefault(event.model, ([], []))
            if len(events) < limit:
                events.append(event)
                records.append(SimpleNamespace(topic=record.topic, partition=0, offset=record.offset))
    if bad:
        log.warning("reference %s: skipped %d lines that are not valid events", path, bad)
    return by_model
