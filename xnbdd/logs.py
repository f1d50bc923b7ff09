"""Where log records go: the journal with structured fields, or plain lines on stderr/file/syslog.

Callers log through logging.getLogger("xnbdd") and attach context as upper-case extras, e.g.
extra={"XNBD_CLIENT": "127.0.0.1:4242"} or extra={"XNBD_ERRNO": "5"}. Under journald those
become journal fields; in text destinations they are rendered as "[client=127.0.0.1:4242]".
Process-wide fields (the export name, the mode) are set once with set_context().

Destinations follow the original xnbd-server (docs/compat.md §1.1): --logpath alone writes the
file only, --syslog alone syslog only, both write both; with neither, stderr, which is the
journal when systemd connected it there (JOURNAL_STREAM) and syslog when stderr is not usable
(--inetd, --daemonize: the caller passes stderr_usable=False).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys
from typing import Any

__all__ = ["destinations", "reopen", "set_context", "setup_logging"]

_context: dict[str, str] = {}
_installed: list[logging.Handler] = []
_settings: dict[str, Any] = {}  # the last setup_logging's arguments (``destinations``)
_FIELD = re.compile(r"[A-Z][A-Z0-9_]*\Z")  # what journald accepts as a client field name
_TEXT_FIELDS = ("XNBD_CLIENT", "XNBD_ERRNO")  # rendered in text lines; the rest is context


def set_context(**fields: str) -> None:
    """Fields added to every record of this process, e.g. XNBD_EXPORT="disk", XNBD_MODE="target".

    A field given as "" is removed. Records may override a context field with their own extra.
    """
    for name, value in fields.items():
        if not _FIELD.match(name):
            raise ValueError(f"not a journal field name: {name!r}")
        if value:
            _context[name] = value
        else:
            _context.pop(name, None)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _context.items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


class _TextFormatter(logging.Formatter):
    """One line per record; the per-record XNBD_* fields are appended compactly."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record).replace("\n", " | ")
        extras = [
            f"{name[5:].lower()}={value}"
            for name, value in record.__dict__.items()
            if name.startswith("XNBD_") and (name in _TEXT_FIELDS or _context.get(name) != value)
        ]
        return f"{line} [{' '.join(extras)}]" if extras else line


class _PrivateFileHandler(logging.FileHandler):
    """Appends to a file created with mode 0600 (the log can name clients and paths);
    reopen() lets logrotate move the file away and SIGHUP start a new one."""

    def __init__(self, path: str) -> None:
        super().__init__(path, mode="a", encoding="utf-8", delay=False)

    def _open(self) -> Any:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        fd = os.open(self.baseFilename, flags, 0o600)
        return open(fd, "a", encoding="utf-8", buffering=1)

    def reopen(self) -> None:
        self.acquire()
        try:
            stream = self._open()
            if self.stream is not None:
                self.stream.close()
            self.stream = stream
        finally:
            self.release()


def _stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM=dev:ino when it connects stderr (or stdout) to the journal."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in value.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def _journal_handler(identifier: str) -> logging.Handler:
    from systemd import journal  # the C extension only matters when journald is really there

    def send_valid_fields(message: str, /, **fields: Any) -> None:
        # JournalHandler passes every LogRecord attribute; journald drops the lower-case ones
        # anyway, so send only real field names (and no repr of exc_info: EXCEPTION_TEXT has it).
        journal.send(
            message,
            **{k: v for k, v in fields.items() if _FIELD.match(k) and k != "EXCEPTION_INFO"},
        )

    handler: logging.Handler = journal.JournalHandler(
        SYSLOG_IDENTIFIER=identifier, sender_function=send_valid_fields
    )
    return handler


def _syslog_handler(identifier: str) -> logging.Handler:
    handler = logging.handlers.SysLogHandler(
        address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON
    )
    handler.setFormatter(_TextFormatter(f"{identifier}[%(process)d]: %(message)s"))
    return handler


def setup_logging(
    *,
    logpath: str | None = None,
    syslog: bool = False,
    identifier: str = "xnbd-server",
    verbose: bool = False,
    stderr_usable: bool = True,
) -> None:
    """Route all logging (the root logger) to the destinations above; calling again replaces them.

    Raises OSError when the log file cannot be opened or syslog cannot be reached; the caller
    reports that as one line and exits.
    """
    _settings.clear()
    _settings.update(
        logpath=logpath,
        syslog=syslog,
        identifier=identifier,
        verbose=verbose,
        stderr_usable=stderr_usable,
    )
    # A daemon never prints logging's own tracebacks: under --inetd stderr can be the client.
    logging.raiseExceptions = False
    root = logging.getLogger()
    for old in _installed:
        root.removeHandler(old)
        old.close()
    _installed.clear()

    # The PID of the record, not of the set-up: --daemonize forks after logging is set up.
    text_format = f"%(asctime)s {identifier}[%(process)d] %(levelname)s: %(message)s"
    handlers: list[logging.Handler] = []
    if logpath:
        file_handler = _PrivateFileHandler(logpath)
        file_handler.setFormatter(_TextFormatter(text_format))
        handlers.append(file_handler)
    if syslog:
        handlers.append(_syslog_handler(identifier))
    if not handlers:
        if _stderr_is_journal():
            handlers.append(_journal_handler(identifier))
        elif stderr_usable:
            stream_handler = logging.StreamHandler(sys.stderr)
            stream_handler.setFormatter(_TextFormatter(text_format))
            handlers.append(stream_handler)
        else:
            handlers.append(_syslog_handler(identifier))

    for handler in handlers:
        handler.addFilter(_ContextFilter())
        root.addHandler(handler)
        _installed.append(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def destinations() -> dict[str, Any]:
    """This process's logging, for a worker process to log the same way: the arguments of
    ``setup_logging`` and the context fields (JSON)."""
    return {"setup": dict(_settings), "context": dict(_context)}


def reopen() -> None:
    """Reopen the log file after rotation (SIGHUP); other destinations need nothing."""
    for handler in _installed:
        if isinstance(handler, _PrivateFileHandler):
            handler.reopen()
