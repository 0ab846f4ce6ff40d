"""Checkpoints of detector state in the state directory, written atomically.

A checkpoint is written to a temporary file, fsynced and renamed over the old one, so a crash leaves
either the previous checkpoint or the new one, never half of one. The files are pickles: the state
directory belongs to the daemon and must not be writable by anyone else.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import pickle
import struct
import tempfile
import time
import zlib
from pathlib import Path
from typing import IO, Any, Callable, Iterator, TypeVar

from monitor.errors import InferWatchError

log = logging.getLogger("inferwatch.state")
T = TypeVar("T")

_FORMAT = 1


class CheckpointStore:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    def prepare(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.dir, prefix=".write-test-"):  # replicas may share the directory
                pass
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
            set_aside(path, "checkpoint")
            return None
        if not isinstance(saved, dict) or saved.get("format") != _FORMAT:
            log.warning("checkpoint %s has an unknown format; starting fresh", path)
            return None
        return saved["state"]


def set_aside(path: Path, what: str) -> None:
    """Move an unreadable file to ``NAME.broken-TIME`` for a post-mortem; the caller starts afresh."""
    aside = path.with_name(f"{path.name}.broken-{int(time.time())}")
    os.replace(path, aside)
    log.exception("%s %s is unreadable; moved to %s, starting afresh", what, path, aside)


def save_record(path: Path, record: dict[str, Any]) -> None:
    """A JSON record (the inventory, the register) written atomically, readable by the daemon's user only."""
    data = json.dumps(record, sort_keys=True).encode()
    with atomic_file(path, 0o600) as handle:
        handle.write(data)


def load_record(path: Path, form: int, decode: Callable[[dict[str, Any]], T], what: str) -> T | None:
    """``decode`` of the JSON record at ``path`` written in format ``form``; None when there is none, or
    when it is damaged (then it is set aside): a record is kept for people, it controls nothing."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_bytes())
        if data.get("format") != form:
            raise ValueError(f"unknown format {data.get('format')!r}")
        return decode(data)
    except Exception:
        set_aside(path, what)
        return None


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


# -- the Kafka daemon's checkpoints ------------------------------------------------------------------
# A checkpoint is written as pieces under keys: the models' shared state ("models") and one piece per
# partition (its clients' state, its held records and the offset they match). Each piece replaces the
# previous one under its key. The offsets are committed after the pieces are written, so a piece's
# offset is never behind its partition's commit: the replica that is assigned the partition reads the
# piece and goes on from the piece's offset (see monitor/daemon.py).


def pack(state: Any) -> bytes:
    return zlib.compress(pickle.dumps({"format": _FORMAT, "state": state}, protocol=pickle.HIGHEST_PROTOCOL), 1)


def unpack(data: bytes) -> Any:
    saved = pickle.loads(zlib.decompress(data))
    if not isinstance(saved, dict) or saved.get("format") != _FORMAT:
        raise ValueError("unknown checkpoint format")
    return saved["state"]


def partition_key(topic: str, partition: int) -> str:
    return f"partition/{topic}/{partition}"


class DirectoryPieces:
    """Checkpoint pieces as files in ``<state dir>/checkpoints/<group>/``, each written atomically.
    Replicas that share the directory (a ReadWriteMany volume) share their checkpoints.

    A partition's piece starts with its offset and never replaces a piece of a higher offset: a
    replica that lost the partition and checkpoints once more before it notices (its consumer process
    tells it at its next poll) cannot put its older piece over the new owner's."""

    HEADER = struct.Struct(">q")

    def __init__(self, directory: str | Path, group: str):
        self.dir = Path(directory) / "checkpoints" / _safe(group)

    def prepare(self) -> None:
        CheckpointStore(self.dir).prepare()

    def _path(self, key: str) -> Path:
        return self.dir / f"{_safe(key)}.pkl.z"

    def put(self, key: str, data: bytes, offset: int = -1) -> bool:
        """Write ``data`` under ``key``; with ``offset`` (a partition's piece), unless the piece there
        has a higher one. Returns whether it was written."""
        path = self._path(key)
        with open(self.dir / f".{path.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another replica's put of the same key waits
            if offset >= 0:
                try:
                    with open(path, "rb") as handle:
                        (current,) = self.HEADER.unpack(handle.read(self.HEADER.size))
                    if current > offset:
                        return False
                except (FileNotFoundError, struct.error):
                    pass
            with atomic_file(path, 0o600) as handle:
                handle.write(self.HEADER.pack(offset))
                handle.write(data)
        return True

    def get(self, key: str) -> bytes | None:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        return data[self.HEADER.size:]

    def remove(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def close(self) -> None:
        pass


def _safe(name: str) -> str:
    """A file name for a key or group id (topic names are [a-zA-Z0-9._-]; anything else is quoted)."""
    import urllib.parse

    return urllib.parse.quote(name, safe="._-")
