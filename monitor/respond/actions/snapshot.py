"""``snapshot``: keep the evidence of an incident: its detection and the last events behind it.

The events come from the daemon's ``EventRing`` (``services.events``): the client's when the detection
names one (``scope: auto`` or ``client``), else the model's. Each snapshot is two files in
``<dir>/<incident id>/`` (``dir`` defaults to ``<state dir>/evidence``):

- ``<UTC timestamp>-<scope>.jsonl.gz``: the first line ``{"detection": {...}}``, then one event per
  line, oldest first, each the event's original JSON (line breaks between tokens become spaces, which
  JSON allows, so one event stays on one line);
- ``<same>.manifest.json``: what the snapshot is and the SHA-256 of the ``.gz`` file's bytes:
  ``incident``, ``playbook``, ``detection_id``, ``model``, ``client_id``, ``scope``, ``last_events``
  (asked), ``events`` (written), ``file``, ``sha256``, ``bytes``, ``created_at`` (epoch seconds).

Both are written to a temporary file, fsynced and renamed, the manifest last, so a manifest always
describes a complete file; both are mode 0640. For forensics, ``verify(manifest)`` (or
``sha256sum`` of the file against the manifest's ``sha256``) shows that the file is the one written.
The hash proves integrity against accidents and against tampering with the file alone; whoever can
rewrite both files can make them agree again, so ship manifests to write-once storage when that
matters.

Taking the same snapshot twice for one incident (same detection, scope and size) returns the first
one instead of writing another, so a step run again after a crash leaves one snapshot.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import time
from pathlib import Path
from typing import IO, Any, Literal

import msgspec

from monitor.ops.state import atomic_file
from monitor.respond.actions import base
from monitor.respond.actions.base import Final, Incident, Services, Transient

FILE_MODE = 0o640
DIR_MODE = 0o750
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class Snapshot(base.Action):
    """Write the incident's detection and the last events of its client (or model) to a gzipped JSONL
    file with a manifest holding its SHA-256.

    Parameters: ``last_events`` (how many, default 500), ``scope`` (``auto``: the client's events when
    the detection names a client, else the model's; ``client``; ``model``), ``dir`` (default
    ``<state dir>/evidence``).

    >>> Snapshot().check(Snapshot.Params(last_events=0))
    Traceback (most recent call last):
    ...
    ValueError: last_events: expected at least 1, got 0
    """

    name = "snapshot"

    class Params(base.Params):
        last_events: int = 500
        scope: Literal["auto", "client", "model"] = "auto"
        dir: str | None = None

    def check(self, params: Params) -> None:
        if params.last_events < 1:
            raise ValueError(f"last_events: expected at least 1, got {params.last_events}")
        if params.dir is not None and not params.dir.strip():
            raise ValueError("dir: expected a directory, or no dir for <state dir>/evidence")

    def run(self, params: Params, incident: Incident, services: Services) -> dict[str, Any]:
        try:
            self.check(params)
        except ValueError as exc:
            raise Final(str(exc)) from None
        if not _SAFE_NAME.match(incident.id):
            raise Final(f"incident id {incident.id!r} cannot name a directory")
        detection = incident.detection
        model = detection.get("model")
        client_id = detection.get("client_id") or None
        # ``client`` without a client in the detection keeps the model's events: evidence over nothing.
        scope = "client" if client_id and params.scope in ("auto", "client") else "model"
        where = Path(params.dir) if params.dir else Path(services.state_dir) / "evidence"
        folder = where / incident.id
        try:
            _make_dirs(folder)
            earlier = _earlier(folder, detection.get("detection_id"), scope, params.last_events)
            if earlier is not None:
                return earlier
            events: list[bytes] = []
            if services.events is not None and model is not None:
                events = services.events.last(model, client_id if scope == "client" else None, params.last_events)
            created = services.now()
            stem = _free_stem(folder, f"{_stamp(created)}-{scope}")
            data = folder / f"{stem}.jsonl.gz"
            digest, size = _write_events(data, detection, events, created)
            manifest = {
                "incident": incident.id, "playbook": incident.playbook,
                "detection_id": detection.get("detection_id"), "model": model, "client_id": client_id,
                "scope": scope, "last_events": params.last_events, "events": len(events),
                "file": data.name, "sha256": digest, "bytes": size, "created_at": created,
            }
            manifest_path = folder / f"{stem}.manifest.json"
            with atomic_file(manifest_path, FILE_MODE) as handle:
                handle.write(json.dumps(manifest, indent=1).encode() + b"\n")
        except OSError as exc:
            # A full or read-only disk may clear; the message names the file, never anything secret.
            raise Transient(f"cannot write the snapshot in {folder}: {exc.strerror or exc}") from None
        return {**manifest, "manifest": str(manifest_path)}


def verify(manifest_path: str | Path) -> bool:
    """True when the snapshot file a manifest names has the manifest's size and SHA-256.

    For forensics: the ``.gz`` beside the manifest is hashed again; any change to it (a byte, a
    truncation, a removal) makes this False. ``sha256sum <file>`` gives the same hash.
    """
    manifest_path = Path(manifest_path)
    try:
        manifest = json.loads(manifest_path.read_bytes())
        name = manifest["file"]
        if not isinstance(name, str) or Path(name).name != name:
            return False  # a manifest only ever names a file beside itself
        digest = hashlib.sha256()
        size = 0
        with open(manifest_path.parent / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
                size += len(block)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return size == manifest.get("bytes") and digest.hexdigest() == manifest.get("sha256")


class _Hashing:
    """A write-only file that hashes and counts what passes through it (the gzip stream's bytes)."""

    def __init__(self, handle: IO[bytes]):
        self.handle = handle
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def _write_events(path: Path, detection: dict[str, Any], events: list[bytes], created: float) -> tuple[str, int]:
    with atomic_file(path, FILE_MODE) as handle:
        hashing = _Hashing(handle)
        # filename="" and a fixed mtime: the gzip header names no temporary file
        with gzip.GzipFile(filename="", mode="wb", fileobj=hashing, mtime=int(created)) as out:  # type: ignore[arg-type]
            out.write(msgspec.json.encode({"detection": detection}) + b"\n")
            for raw in events:
                if b"\n" in raw or b"\r" in raw:
                    # Outside strings these are insignificant whitespace; inside, JSON forbids them raw.
                    raw = raw.replace(b"\r", b" ").replace(b"\n", b" ")
                out.write(raw.strip() + b"\n")
    return hashing.digest.hexdigest(), hashing.size


def _earlier(folder: Path, detection_id: Any, scope: str, last_events: int) -> dict[str, Any] | None:
    """The manifest of the same snapshot already taken for this incident, if it is intact."""
    for path in sorted(folder.glob("*.manifest.json")):
        try:
            manifest = json.loads(path.read_bytes())
        except (OSError, ValueError):
            continue
        if (manifest.get("detection_id") == detection_id and manifest.get("scope") == scope
                and manifest.get("last_events") == last_events and verify(path)):
            return {**manifest, "manifest": str(path), "existing": True}
    return None


def _free_stem(folder: Path, stem: str) -> str:
    candidate, n = stem, 1
    while (folder / f"{candidate}.jsonl.gz").exists() or (folder / f"{candidate}.manifest.json").exists():
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def _stamp(when: float) -> str:
    """``20251127T080000.123Z``: sortable, UTC, no characters a file system minds.

    >>> _stamp(1764230400.5)
    '20251127T080000.500Z'
    """
    seconds, millis = divmod(int(round(when * 1000)), 1000)
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _make_dirs(folder: Path) -> None:
    for directory in reversed([folder, *folder.parents]):
        if not directory.exists():
            directory.mkdir(mode=DIR_MODE, exist_ok=True)
