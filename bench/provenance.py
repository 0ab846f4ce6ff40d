"""Which code a benchmark measured: a hash of the files that decide its figures, and the git commit,
saying when those files differ from it (or are untracked). Figures belong to the code as it was."""

from __future__ import annotations

import hashlib
import os
import subprocess

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def code_version(files: list[str], what: str) -> str:
    """``files`` relative to the repository root; ``what`` names them for people ("detector files")."""
    digest = hashlib.sha256()
    for f in files:
        try:
            with open(os.path.join(ROOT, f), "rb") as fh:
                digest.update(fh.read())
        except OSError:
            pass
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        changed = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", *files], capture_output=True,
                                 text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head, changed = "", ""
    where = (f"commit {head}" + (f" with uncommitted or untracked {what}" if changed else "")) if head else "no git"
    return f"{what} sha256 {digest.hexdigest()[:12]} ({where})"
