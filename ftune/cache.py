"""Where ftune caches derived data (tokenized datasets, base-model probe perplexities), and their keys."""

import hashlib
import json
import os
from collections.abc import Iterable
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


def files_fingerprint(paths: Iterable[Path]) -> str:
    """A short hash of the names and bytes of files, e.g. the source of the code that shapes cached data.

    Content, not modification times: an installed package's files all carry its install time and a checkout's
    change with every `git checkout`, while neither says whether the code differs. Each file is framed by its
    name and length, so that text moved from the end of one file to the start of the next changes the hash.
    """
    digest = hashlib.sha256()
    for path in paths:
        content = path.read_bytes()
        digest.update(f"{path.name}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()[:20]
