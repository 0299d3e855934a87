"""Write-then-rename: an output (checkpoint, final/, cache entry, merged model, plot) appears whole or not at all.

Every artefact ftune writes goes through `atomic_dir` or `atomic_file`: the content is written under a hidden
temporary name in the same directory, then renamed into place, which POSIX makes atomic within one file system.
A crash, a full disk or Ctrl-C leaves the old output (or nothing), never a half-written one; a failure removes
the temporary.
"""

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STAGING_PREFIX = ".tmp-"
"""Temporary outputs start with this; listings of checkpoints and cache entries skip such names."""


def staging_path(target: Path, shared: bool = False) -> Path:
    """The temporary sibling of `target`: unique per call, or (`shared`) the same for every process of a run."""
    suffix = "" if shared else f"-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return target.with_name(f"{STAGING_PREFIX}{target.name}{suffix}")


@contextmanager
def atomic_dir(target: Path, replace: bool = True, staging: Path | None = None) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it becomes `target`.

    Args:
        target: the directory to publish.
        replace: an existing `target` is replaced; with False the first writer wins and a later one's content
            is discarded (cache entries that two processes build at once hold the same rows).
        staging: a temporary path chosen by the caller (e.g. the same on every rank for a sharded checkpoint);
            by default a unique sibling of `target`.
    """
    staging = staging or staging_path(target)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_dir(staging, target, replace)


def publish_dir(staging: Path, target: Path, replace: bool = True) -> None:
    """Rename a complete `staging` directory to `target` (see `atomic_dir`)."""
    if target.exists() and not replace:
        shutil.rmtree(staging, ignore_errors=True)
        return
    old = staging_path(target) if target.exists() else None
    if old is not None:
        target.rename(old)  # two renames: a directory cannot be replaced by one while it holds files
    try:
        staging.rename(target)
    except OSError:
        if replace or not target.exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)  # another process published the same entry first
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target` in one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(target)
    try:
        yield staging
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    os.replace(staging, target)


def write_text(target: Path, text: str) -> None:
    """Write a whole text file atomically."""
    with atomic_file(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
