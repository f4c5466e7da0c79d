"""Where a training process's output goes: the console keeps our own messages, progress, metrics and errors;
what the libraries say goes to a log file in the run directory (``RUN_DIR/logs/<process>.log``).

Three routes reach the console from a library, and each is taken over here:

* Python warnings (torch deprecating the collectives ZeRO-3 calls, Megatron's hints, the ShardedTensor
  notices of torch's checkpoint loader): written to the file once per distinct warning and place.
  Libraries reset Python's warning registry (each ``catch_warnings`` does), so without this the same
  FutureWarning repeats every step. A warning raised from lucid_megatron's own code is ours and is shown
  on the console as well.
* Log records of loggers that print to the console themselves (DeepSpeed's ``DeepSpeed`` logger, torch's
  ``torch.*`` loggers): their console handlers are replaced by the file, plus the console for ERROR and above.
* Log records that reach the root logger (Megatron's loggers): the same two handlers on the root logger.

Tracebacks and ``print`` are untouched, so an exception still reaches the console in full. The file is
created with its first record; until the run's checks pass, records can be held in memory (``hold``).
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

# Warnings raised from files under this directory are lucid_megatron's own messages.
PACKAGE_DIR = str(Path(__file__).resolve().parents[1])

FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONSOLE_FORMAT = "%(name)s %(levelname)s: %(message)s"


class _LogFile(logging.FileHandler):
    """Appends to ``path``, creating it (and its directory) with the first record written. While ``held``, records
    wait in memory instead: a run refused by its checks must leave no run directory behind."""

    def __init__(self, path: Path, *, hold: bool):
        super().__init__(path, mode="a", delay=True)
        self.held: list[logging.LogRecord] | None = [] if hold else None

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()

    def emit(self, record: logging.LogRecord) -> None:
        if self.held is not None:
            self.held.append(record)
        else:
            super().emit(record)

    def write_held(self) -> None:
        held, self.held = self.held or [], None
        for record in held:
            super().emit(record)


class LibraryOutput:
    """The routing of one process (:func:`route_library_output` installs it)."""

    def __init__(self, log_file: Path, *, hold: bool = False):
        self.log_file = Path(log_file)
        self.file = _LogFile(self.log_file, hold=hold)
        self.file.setFormatter(logging.Formatter(FILE_FORMAT))
        self.errors = logging.StreamHandler(sys.stderr)
        self.errors.setLevel(logging.ERROR)
        self.errors.setFormatter(logging.Formatter(CONSOLE_FORMAT))
        self.warnings_log = logging.getLogger("py.warnings")
        self.seen: set[tuple] = set()

    def show_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        """Replacement for :func:`warnings.showwarning`."""
        text = warnings.formatwarning(message, category, filename, lineno, line)
        if file is not None:  # the caller chose a stream: honour it
            file.write(text)
            return
        if str(filename).startswith(PACKAGE_DIR):
            sys.stderr.write(text)
        key = (category, str(message), filename, lineno)
        if key not in self.seen:
            self.seen.add(key)
            self.warnings_log.warning(text.rstrip())

    def claim_console_handlers(self) -> None:
        """Point every logger that writes to stdout/stderr at the log file (and the console for errors).

        Call again after importing a library that creates such loggers at import (DeepSpeed does)."""
        loggers = [logging.getLogger()] + [logger for logger in logging.Logger.manager.loggerDict.values()
                                            if isinstance(logger, logging.Logger)]
        streams = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) if s is not None}
        for logger in loggers:
            console = [h for h in logger.handlers if _writes_to(h, streams)]
            for handler in console:
                logger.removeHandler(handler)
            if console or logger is logging.getLogger():
                for handler in (self.file, self.errors):
                    if handler not in logger.handlers:
                        logger.addHandler(handler)

    def install(self) -> "LibraryOutput":
        self.previous_showwarning = warnings.showwarning
        warnings.showwarning = self.show_warning
        self.claim_console_handlers()
        return self

    def uninstall(self) -> None:
        """Take the file off every logger (the console handlers it replaced are not restored)."""
        if warnings.showwarning == self.show_warning:
            warnings.showwarning = self.previous_showwarning
        for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
            if isinstance(logger, logging.Logger):
                for handler in (self.file, self.errors):
                    logger.removeHandler(handler)
        self.file.close()


def _writes_to(handler: logging.Handler, streams: set[int]) -> bool:
    if isinstance(handler, logging.FileHandler) or not isinstance(handler, logging.StreamHandler):
        return False
    return id(handler.stream) in streams


_installed: LibraryOutput | None = None


def route_library_output(log_file: Path, *, hold: bool = False) -> LibraryOutput:
    """Send this process's library warnings and log records to ``log_file`` (appended to; made on first use).

    With ``hold``, nothing is written until :func:`release_log_file` (records wait in memory), so that checks
    which may refuse the run come first."""
    global _installed
    if _installed is not None and _installed.log_file == Path(log_file):
        _installed.claim_console_handlers()
        return _installed
    if _installed is not None:
        _installed.uninstall()
    _installed = LibraryOutput(log_file, hold=hold).install()
    return _installed


def release_log_file() -> None:
    """Write the held records and every later one to the log file (no-op when nothing is routed)."""
    if _installed is not None:
        _installed.file.write_held()


def claim_console_handlers() -> None:
    """Re-route loggers created since :func:`route_library_output` (no-op when nothing is routed)."""
    if _installed is not None:
        _installed.claim_console_handlers()
