"""What is on disk, to show a command left it alone: the sha256 of every file under a folder, and
every folder (a command that leaves an empty folder behind changed the disk too)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def tree_digest(root: Path) -> dict[str, str]:
    """{path relative to root: sha256 of its bytes, or "dir"} for everything below root."""
    root = Path(root)
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}
