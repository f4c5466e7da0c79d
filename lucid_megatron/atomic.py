"""Atomic writes: a reader (or a restarted job) sees the old content or the new, never half of it.

Every file or directory the project writes for others to read goes through here: stage under a unique
sibling name, flush to disk, rename over the target, flush the parent directory (so the rename itself
survives a crash).  A failure removes the staged copy and leaves the target as it was.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path


def _staging_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def fsync_dir(path) -> None:
    """Make renames and creations inside directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    path = Path(path)
    tmp = _staging_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def publish_dir(staging, final) -> None:
    """Rename a fully written directory ``staging`` to ``final`` (which must be absent or empty)."""
    final = Path(final)
    os.replace(staging, final)  # POSIX rename may replace an empty directory
    fsync_dir(final.parent)


def require_empty_output(out_dir) -> Path:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output directory {str(out)!r} exists and is not empty; choose a new one or remove it")
    return out


@contextlib.contextmanager
def staged_directory(out_dir):
    """Yield a sibling staging directory that becomes ``out_dir`` only if the block succeeds.

    A failed or interrupted run leaves nothing at ``out_dir``, so it can simply be run again.
    """
    out = require_empty_output(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_name(out)
    staging.mkdir()
    try:
        yield staging
        publish_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
