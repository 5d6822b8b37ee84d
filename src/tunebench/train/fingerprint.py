"""A fingerprint of the code that produced a run: the hash of tunebench's own source files."""

from __future__ import annotations

import hashlib
from pathlib import Path


def code_fingerprint() -> str:
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
