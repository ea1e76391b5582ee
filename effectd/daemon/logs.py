"""Logging setup for the effectd daemon: one line per record, levelled, with key=value fields.

Why a module of its own: the daemon runs in three settings that want different output, and
the choice must be made in one place, once, before anything logs.

* In a terminal (``effectd`` run by hand): stderr, ``time level logger: message k=v``.
* Under systemd: stderr is connected to journald, which sets ``$JOURNAL_STREAM``. Each line
  is prefixed with its syslog priority (``<6>``, ``sd-daemon(3)``), so ``journalctl -p warning``
  works, and carries no timestamp, since the journal stamps every entry itself.
* Autostarted by a client (``log_file`` given): no one reads stderr, so records go to a
  size-capped ``RotatingFileHandler`` (timestamps on); the disk use is bounded by
  ``max_bytes * (backups + 1)``.

One line per record keeps rotation, ``grep`` and the journal's one-entry-per-line model
simple: newlines inside messages and tracebacks are escaped as ``\\n``.

Structured fields: ``log.info("effect finished", extra={"fields": {"id": eid, "rc": 0}})``
renders ``... effect finished id=ab12 rc=0``; values with spaces, quotes or ``=`` are quoted.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, TextIO

__all__ = [
    "DEFAULT_BACKUPS",
    "DEFAULT_MAX_BYTES",
    "LEVEL_ENV",
    "OneLineFormatter",
    "configure_logging",
    "journal_stream_active",
    "parse_level",
    "reset_logging",
]

LEVEL_ENV = "EFFECTD_LOG_LEVEL"
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUPS = 3

_SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}

_MARK = "_effectd_handler"
"""Attribute set on the handlers this module installs, so reconfiguring replaces them."""


def parse_level(level: str | int) -> int:
    """A logging level from a name (any case, ``WARN`` accepted) or a number."""
    if isinstance(level, int):
        return level
    text = level.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    name = text.upper()
    if name == "WARN":
        name = "WARNING"
    # getLevelName() maps a registered name to its number (custom levels included).
    value = logging.getLevelName(name)
    if not isinstance(value, int):
        raise ValueError(f"unknown log level {level!r}")
    return value


def _syslog_priority(levelno: int) -> int:
    """Map any level, custom ones included, to the syslog priority of the level below it."""
    for threshold in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= threshold:
            return _SYSLOG_PRIORITY[threshold]
    return _SYSLOG_PRIORITY[logging.DEBUG]


def _quote(value: object) -> str:
    text = str(value)
    if text and not any(c.isspace() or c in '"=\\' for c in text):
        return text
    escaped = (
        text.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    return f'"{escaped}"'


def _one_line(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\\r").replace("\n", "\\n")


class OneLineFormatter(logging.Formatter):
    """``[<N>][time ]LEVEL logger: message key=value ...`` on a single line.

    ``journald=True`` adds the ``<N>`` syslog priority prefix and drops the timestamp.
    """

    def __init__(self, *, journald: bool = False) -> None:
        super().__init__()
        self.journald = journald

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        # ISO 8601 with milliseconds and the UTC offset: sortable and unambiguous.
        ct = time.localtime(record.created)
        millis = int(record.msecs)
        offset = time.strftime("%z", ct)
        return f"{time.strftime('%Y-%m-%dT%H:%M:%S', ct)}.{millis:03d}{offset}"

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        fields: Any = getattr(record, "fields", None)
        parts: list[str] = []
        if self.journald:
            parts.append(f"<{_syslog_priority(record.levelno)}>{record.levelname}")
        else:
            parts.append(f"{self.formatTime(record)} {record.levelname}")
        parts.append(f" {record.name}: {_one_line(message)}")
        if isinstance(fields, Mapping):
            for key, value in fields.items():
                parts.append(f" {key}={_quote(value)}")
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            parts.append(" | " + _one_line(record.exc_text))
        if record.stack_info:
            parts.append(" | " + _one_line(self.formatStack(record.stack_info)))
        return "".join(parts)


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """Creates the log (and each rotated successor) with mode 0600: commands may hold secrets."""

    def _open(self) -> Any:
        def opener(path: str, flags: int) -> int:
            return os.open(path, flags, 0o600)

        return open(
            self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors, opener=opener
        )


def journal_stream_active(
    stream: IO[str] | None = None, environ: Mapping[str, str] | None = None
) -> bool:
    """Whether ``stream`` (default stderr) is the journald stream named by ``$JOURNAL_STREAM``.

    ``$JOURNAL_STREAM`` is ``DEVICE:INODE`` of the stream systemd connected. It is inherited by
    every descendant, so it is compared with the stream's own fstat() as ``sd-daemon(3)``
    advises: a daemon started from a shell inside some unit, with stderr redirected elsewhere,
    must not emit ``<N>`` prefixes. A stream without a file descriptor is never the journal.
    """
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    if not value:
        return False
    dev_text, sep, ino_text = value.partition(":")
    if not sep:
        return False
    try:
        dev, ino = int(dev_text), int(ino_text)
    except ValueError:
        return False
    target = sys.stderr if stream is None else stream
    try:
        st = os.fstat(target.fileno())
    except (AttributeError, OSError, ValueError):
        # io.UnsupportedOperation (a StringIO) is both an OSError and a ValueError.
        return False
    return st.st_dev == dev and st.st_ino == ino


def reset_logging() -> None:
    """Remove and close the handlers :func:`configure_logging` installed on the root logger."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _MARK, False):
            root.removeHandler(handler)
            handler.close()


def configure_logging(
    level: str | int | None = "INFO",
    log_file: Path | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    backups: int = DEFAULT_BACKUPS,
    *,
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Set up the root logger for the daemon; calling it again replaces the previous setup.

    ``level``: a name or number; None means ``$EFFECTD_LOG_LEVEL``, else INFO (an invalid
    variable falls back to INFO with a warning, an invalid argument raises ValueError).
    ``log_file``: log there instead of stderr, rotated at ``max_bytes`` keeping ``backups``
    old files; its directory is created (mode 0700) if missing.
    ``stream`` and ``environ`` default to ``sys.stderr`` and ``os.environ`` (tests pass theirs).
    """
    env = os.environ if environ is None else environ
    bad_env_level: str | None = None
    if level is None:
        raw = env.get(LEVEL_ENV, "").strip()
        resolved = logging.INFO
        if raw:
            try:
                resolved = parse_level(raw)
            except ValueError:
                bad_env_level = raw
    else:
        resolved = parse_level(level)

    handler: logging.Handler
    if log_file is not None:
        path = Path(log_file)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        handler = _PrivateRotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
        )
        handler.setFormatter(OneLineFormatter(journald=False))
    else:
        out = sys.stderr if stream is None else stream
        handler = logging.StreamHandler(out)
        handler.setFormatter(OneLineFormatter(journald=journal_stream_active(out, env)))
    setattr(handler, _MARK, True)

    reset_logging()
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(resolved)
    # Warnings from the warnings module go through logging too, one line each.
    logging.captureWarnings(True)
    if bad_env_level is not None:
        logging.getLogger(__name__).warning(
            "ignoring invalid %s, using INFO", LEVEL_ENV, extra={"fields": {"value": bad_env_level}}
        )
