"""Atomic writes: a reader (or a restarted job) sees the old content or the new, never half of it.

Every file or directory the project writes for others to read goes through here: stage under a unique
sibling name, flush to disk, rename over the target, flush the parent directory (so the rename itself
survives a crash).  A failure removes the staged copy and leaves the target as it was.

Writes replace only regular files: a target that exists as anything else (a device such as ``/dev/full``,
a FIFO, a socket, a directory where a file is due, a symlink to one of those) is refused with
:class:`OutputPathError` before anything is written; commands call :func:`check_output_file` /
:func:`check_output_dir` up front, before their expensive part.

Staging names are ``.<name>.tmp-<pid>-<hex>`` next to the target.  A process killed before its rename
(SIGKILL) leaves one behind; the next write of the same target removes those whose process is gone (the pid
is this machine's: writers of one target on different machines sharing a filesystem are not supported).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import stat
import threading
from pathlib import Path


class OutputPathError(ValueError):
    """An output path that exists and is not something the command may replace."""


_FILE_ALLOWED = "it must be a regular file or a new path"
_DIR_ALLOWED = "it must be a new path or an empty directory"

_KINDS = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def _kind_of(mode: int) -> str:
    return next((name for is_kind, name in _KINDS if is_kind(mode)), "a special file")


def entry_kind(path) -> str | None:
    """What an existing ``path`` is, links followed ('a regular file', 'a directory', 'a FIFO', ...; 'unreadable'
    if it cannot be looked at); None if nothing is there."""
    try:
        return _kind_of(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        return "unreadable"


def _existing_kind(path: Path, label: str) -> str | None:
    """What is at ``path`` ("a character device", "a symlink to a directory", ...); None if nothing is."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise OutputPathError(f"{label} {str(path)!r} lies under a path that is not a directory") from None
    if not stat.S_ISLNK(mode):
        return _kind_of(mode)
    try:
        return f"a symlink to {_kind_of(path.stat().st_mode)}"
    except OSError:  # dangling or a loop: renaming over the link itself harms nothing
        return "a dangling symlink"


def check_output_file(path, *, label: str = "output") -> Path:
    """``path`` as a Path if a file may be written there: nothing there yet, a regular file, or a symlink to
    one or to nothing (the link itself is replaced).  Anything else raises :class:`OutputPathError`."""
    path = Path(path)
    kind = _existing_kind(path, label)
    if kind not in (None, "a regular file", "a symlink to a regular file", "a dangling symlink"):
        raise OutputPathError(f"{label} {str(path)!r} is {kind}; {_FILE_ALLOWED}")
    return path


def check_output_dir(path, *, label: str = "output directory") -> Path:
    """``path`` as a Path if a directory may be published there: nothing there yet, or an empty directory
    (not a symlink: a directory cannot be renamed over one).  A non-empty directory raises FileExistsError,
    anything else :class:`OutputPathError`."""
    path = Path(path)
    kind = _existing_kind(path, label)
    if kind == "a directory" and any(path.iterdir()):
        raise FileExistsError(f"{label} {str(path)!r} exists and is not empty; choose a new one or remove it")
    if kind not in (None, "a directory"):
        raise OutputPathError(f"{label} {str(path)!r} is {kind}; {_DIR_ALLOWED}")
    return path


# ----------------------------------------------------------------------------------------- staging names


def staging_path(path) -> Path:
    """A fresh sibling name to stage ``path`` under: ``.<name>.tmp-<pid>-<hex>``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _staging_pid(entry_name: str, target_name: str) -> int | None:
    """The writer's pid if ``entry_name`` stages ``target_name`` (``.<name>.tmp-<pid>[-<hex>]``), else None."""
    prefix = f".{target_name}.tmp-"
    if not entry_name.startswith(prefix):
        return None
    pid = entry_name[len(prefix):].split("-", 1)[0]
    return int(pid) if pid.isdigit() and int(pid) > 0 else None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OverflowError:  # no process has such a pid
        return False
    return True


def remove_stale_staging(path) -> list[Path]:
    """Remove the staging entries of ``path`` left by writers that are gone (killed before their rename);
    those of running processes stay.  Returns what was removed."""
    path = Path(path)
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        pid = _staging_pid(entry.name, path.name)
        if pid is None or _process_alive(pid):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            Path(entry.path).unlink(missing_ok=True)
        removed.append(Path(entry.path))
    return removed


# ----------------------------------------------------------------------------------------- writing


def fsync_dir(path) -> None:
    """Make renames and creations inside directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_figure(path, figure, **savefig_options) -> None:
    """Render a matplotlib ``figure`` in memory (the format from ``path``'s suffix) and write it atomically."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", **savefig_options)
    write_bytes(path, buffer.getvalue())


def write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (refused, before anything is written, if ``path`` is not a
    regular file or a new path)."""
    path = check_output_file(path)
    remove_stale_staging(path)
    tmp = staging_path(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    write_bytes(path, text.encode("utf-8"))


def publish_dir(staging, final) -> None:
    """Rename a fully written directory ``staging`` to ``final`` (which must be absent or empty)."""
    final = check_output_dir(final)
    os.replace(staging, final)  # POSIX rename may replace an empty directory
    fsync_dir(final.parent)


@contextlib.contextmanager
def _sigterm_raises_system_exit():
    """SIGTERM's default action ends the process on the spot, leaving the staging copy behind; while one is
    written it raises SystemExit instead (exit status 143, as for the signal), so the copy is removed on the
    way out.  A handler someone else installed (training's preemption flag) is left alone."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def staged_directory(out_dir):
    """Yield a sibling staging directory that becomes ``out_dir`` only if the block succeeds.

    ``out_dir`` is checked before anything is written (:func:`check_output_dir`).  A failed or interrupted
    run (an exception, Ctrl-C, SIGTERM) leaves nothing at ``out_dir``, so it can simply be run again; a
    SIGKILLed one leaves its staging directory, removed by the next run.
    """
    out = check_output_dir(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    staging = staging_path(out)
    with _sigterm_raises_system_exit():
        try:
            staging.mkdir()
            yield staging
            publish_dir(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
