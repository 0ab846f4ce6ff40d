"""Checkpoints of detector state in the state directory, written atomically.

A checkpoint is written to a temporary file, fsynced and renamed over the old one, so a crash leaves
either the previous checkpoint or the new one, never half of one. The files are pickles: the state
directory belongs to the daemon and must not be writable by anyone else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Iterator

from monitor.errors import InferWatchError

log = logging.getLogger("inferwatch.state")

_FORMAT = 1


class CheckpointStore:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    def prepare(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise InferWatchError(f"state directory {self.dir}: not writable ({exc.strerror})") from None

    def save(self, name: str, state: Any) -> float:
        """Write ``state`` under ``name``; returns the seconds it took."""
        start = time.perf_counter()
        path = self.dir / f"{name}.pkl"
        with atomic_file(path, 0o600) as handle:
            pickle.dump({"format": _FORMAT, "saved_at": time.time(), "state": state}, handle,
                        protocol=pickle.HIGHEST_PROTOCOL)
        return time.perf_counter() - start

    def load(self, name: str) -> Any | None:
        path = self.dir / f"{name}.pkl"
        if not path.exists():
            return None
        try:
            with open(path, "rb") as handle:
                saved = pickle.load(handle)
        except Exception:
            # A damaged checkpoint costs re-learning, not the daemon: keep it aside for a post-mortem.
            aside = path.with_suffix(f".broken-{int(time.time())}")
            os.replace(path, aside)
            log.exception("checkpoint %s is unreadable; moved to %s and starting fresh", path, aside)
            return None
        if not isinstance(saved, dict) or saved.get("format") != _FORMAT:
            log.warning("checkpoint %s has an unknown format; starting fresh", path)
            return None
        return saved["state"]


@contextlib.contextmanager
def atomic_file(path: Path, mode: int) -> Iterator[IO[bytes]]:
    """A binary file written under a temporary name, fsynced and renamed over ``path`` on success, so
    readers (and a crash) see the old file or the whole new one; removed on failure."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)  # mkstemp's 0600, whatever the umask: the mode asked for exactly
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)  # the rename itself survives a power loss


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems refuse to open a directory; the data is synced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
