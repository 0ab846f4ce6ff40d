"""JSONL, JSONL.gz and standard input as a source: one message per line, fed to the same pipeline.

Each line becomes a record whose topic is the file name and whose offset is the line number,
so a dead letter from a file says exactly which line was bad (lines count from 1).
"""

from __future__ import annotations

import glob
import gzip
import sys
from pathlib import Path
from typing import BinaryIO, Iterator, NamedTuple, Sequence

from monitor.errors import InferWatchError


class FileRecord(NamedTuple):
    value: bytes
    key: bytes | None
    topic: str
    partition: int
    offset: int
    timestamp: int | None


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Paths from names and globs, in the order given (globs sorted); ``-`` is standard input."""
    paths: list[str] = []
    for pattern in patterns:
        if pattern == "-":
            paths.append("-")
            continue
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not matches:
            raise InferWatchError(f"--input {pattern}: no file matches")
        for path in matches:
            if Path(path).is_dir():
                raise InferWatchError(f"--input {path}: is a directory (give files or a glob such as {path}/*.jsonl)")
            if not Path(path).is_file():
                raise InferWatchError(f"--input {path}: no such file")
            paths.append(path)
    return paths


def _open(path: str) -> BinaryIO:
    handle = sys.stdin.buffer if path == "-" else open(path, "rb")
    if handle.peek(2)[:2] == b"\x1f\x8b":  # gzip by content, whatever the file is called
        return gzip.GzipFile(fileobj=handle)  # type: ignore[return-value]
    return handle


class FileSource:
    """Reads records in batches from files; ``read_bytes`` counts progress for a progress bar."""

    def __init__(self, patterns: Sequence[str], batch_size: int = 5000, max_line_bytes: int = 1_048_576):
        self.paths = expand_inputs(patterns)
        self.batch_size = batch_size
        # A line longer than this is still read whole (so the next line starts right) but cut to
        # max_line_bytes + 1 bytes, enough for the decoder to reject it as too large.
        self.max_line_bytes = max_line_bytes
        self.read_bytes = 0
        self._raw_done = 0  # bytes of the files read to the end
        self._raw: BinaryIO | None = None  # the file being read (its compressed bytes, for a .gz)

    def batches(self) -> Iterator[list[FileRecord]]:
        batch: list[FileRecord] = []
        for path in self.paths:
            name = "stdin" if path == "-" else path
            handle = _open(path)
            self._raw = getattr(handle, "fileobj", handle)
            try:
                for number, line in enumerate(self._lines(handle), 1):
                    self.read_bytes += len(line)
                    value = line.rstrip(b"\r\n")
                    if not value.strip():
                        continue  # blank lines are formatting, not messages
                    batch.append(FileRecord(value, None, name, 0, number, None))
                    if len(batch) >= self.batch_size:
                        yield batch
                        batch = []
            except (OSError, EOFError, gzip.BadGzipFile) as exc:
                raise InferWatchError(f"{name}: cannot read: {exc}") from None
            finally:
                if path != "-":
                    self._raw_done += self._raw_tell()
                    handle.close()
                    if self._raw is not handle:
                        self._raw.close()  # GzipFile leaves the file it was given open
                self._raw = None
        if batch:
            yield batch

    def raw_position(self) -> int:
        """Bytes of the input files read so far, as stored (compressed for .gz): progress against their sizes."""
        return self._raw_done + (self._raw_tell() if self._raw is not None else 0)

    def _raw_tell(self) -> int:
        try:
            return self._raw.tell() if self._raw is not None else 0
        except (OSError, ValueError):
            return 0

    def _lines(self, handle: BinaryIO) -> Iterator[bytes]:
        limit = self.max_line_bytes + 1
        while True:
            line = handle.readline(limit)
            if not line:
                return
            if len(line) >= limit and not line.endswith(b"\n"):
                while True:  # skip the rest of an oversized line in bounded chunks
                    rest = handle.readline(1 << 20)
                    self.read_bytes += len(rest)
                    if not rest or rest.endswith(b"\n"):
                        break
            yield line
