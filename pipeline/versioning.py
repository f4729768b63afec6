"""Which data a model saw: a content hash of a dataset directory (stable across machines and copies)."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20


def dataset_version(root: Path | str) -> str:
    """sha256 over every file's relative path and bytes, in sorted order; first 16 hex digits."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
    return digest.hexdigest()[:16]
