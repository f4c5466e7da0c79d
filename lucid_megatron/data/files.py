"""Atomic file and directory writes: readers never see half-written data."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to a temporary name next to ``path``, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    staging.mkdir()
    try:
        yield staging
        os.replace(staging, out)  # POSIX rename may replace an empty directory
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
