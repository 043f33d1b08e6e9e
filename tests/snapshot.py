"""What is on disk, to show a command left it alone: the sha256 of every file under a folder."""

from __future__ import annotations

import hashlib
from pathlib import Path


def tree_digest(root: Path) -> dict[str, str]:
    """{path relative to root: sha256 of its bytes} for every file below root (empty if none)."""
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}
