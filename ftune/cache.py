"""Where ftune caches derived data (tokenized datasets, base-model probe perplexities), and their keys."""

import hashlib
import json
import os
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """`$FTUNE_CACHE/<kind>` (default `~/.cache/ftune/<kind>`), created on demand."""
    root = Path(os.environ.get("FTUNE_CACHE", Path.home() / ".cache" / "ftune"))
    path = root / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_signature(path: str | Path) -> dict:
    """What identifies a file's content cheaply: resolved path, size and modification time."""
    stat = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def fingerprint(*parts: object) -> str:
    """A short stable hash of JSON-serialisable parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]
