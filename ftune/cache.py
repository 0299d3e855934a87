"""Where ftune caches derived data (tokenized datasets, base-model probe perplexities), and their keys."""

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ftune.atomic import STAGING_PREFIX

ABOUT_FILE = "about.json"
"""What made a cache entry (written by its builder), shown by `ftune data --cache-info`."""


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


@dataclass
class CacheEntry:
    """One entry of a cache kind: a complete one, or a staging directory a build left (see `ftune.atomic`)."""

    path: Path
    size: int
    """Bytes on disk."""
    complete: bool
    builder_pid: int | None = None
    """For a staging directory, the process that writes it, if it still runs (on this machine)."""
    about: dict = field(default_factory=dict)


def cache_entries(kind: str) -> list[CacheEntry]:
    """The entries under `cache_dir(kind)`, in name order, with their size and `about.json`.

    A staging directory is a build in progress, or one a crash (or `kill -9`) left: it is never read as an
    entry, since only a complete build is renamed to its key.
    """
    entries = []
    for path in sorted(cache_dir(kind).iterdir()):
        complete = not path.name.startswith(STAGING_PREFIX)
        about = path / ABOUT_FILE
        entries.append(CacheEntry(path, disk_size(path), complete, None if complete else running_builder(path),
                                  json.loads(about.read_text(encoding="utf-8")) if about.is_file() else {}))
    return entries


def clear_cache(kind: str) -> list[CacheEntry]:
    """Remove every entry of `kind` and every staging directory no running process writes; return what went.

    A reader that has an entry's files memory-mapped keeps reading them (POSIX frees them on its last close).
    """
    removed = [entry for entry in cache_entries(kind) if entry.builder_pid is None]
    for entry in removed:
        if entry.path.is_dir():
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            entry.path.unlink(missing_ok=True)
    return removed


def disk_size(path: Path) -> int:
    """Bytes of a file, or of every file under a directory."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def running_builder(staging: Path) -> int | None:
    """The process id in a staging name (`.tmp-NAME-PID-RANDOM`) if that process is alive, else None."""
    pid = staging.name.rsplit("-", 2)[-2] if staging.name.count("-") >= 3 else ""
    if not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return int(pid)
