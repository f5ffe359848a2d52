"""Plugin logging in the hclog JSON shape that go-plugin parses from the plugin's stderr.

go-plugin (``client.go`` ``logStderr``, ``log_entry.go`` ``parseJSON``) reads stderr line by line
with a 64 KiB buffer. A line that is a JSON object is an hclog record:

* ``@message``, ``@level`` and ``@timestamp`` are read with *unchecked* Go type assertions, so a
  non-string value panics the Nomad agent. This module only ever writes strings there.
* ``@timestamp`` must parse with Go layout ``2006-01-02T15:04:05.000000Z07:00`` (exactly six
  fractional digits), else the line is logged raw at DEBUG.
* ``@level`` is one of ``trace|debug|info|warn|error``; every other key, ``@module`` included,
  becomes a key/value pair on the agent's log line.

Structured fields: pass a mapping as ``extra={"fields": {...}}``, or use the :func:`fields`
shorthand: ``log.info("vm started", extra=fields(task_id=tid, pid=123))``. Values are reduced
to JSON-safe ``str``/``int``/``float``/``bool``/``None``; exceptions logged with
``log.exception`` (or ``exc_info=``) appear as an ``error`` field holding the traceback.

stdout carries the go-plugin handshake, so nothing here ever writes to it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import BinaryIO, Final

from nomad_vm.errors import ConfigError

__all__ = [
    "LOG_FILE_ENV",
    "OFF",
    "TRACE",
    "HclogJSONFormatter",
    "SafeFdHandler",
    "configure_plugin_logging",
    "fields",
    "format_timestamp",
    "hclog_level",
    "parse_log_level",
]

TRACE: Final = 5
OFF: Final = logging.CRITICAL + 10
logging.addLevelName(TRACE, "TRACE")

# Nomad's agent accepts these log_level names, case-insensitively (command/agent/log_levels.go).
NOMAD_LOG_LEVELS: Final[Mapping[str, int]] = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "off": OFF,
}

LOG_FILE_ENV: Final = "NOMAD_VM_LOG_FILE"

# go-plugin's reader holds 64 KiB including the newline; longer lines are split and logged raw.
# Stay well below so a long traceback still arrives as one structured record.
MAX_LINE_CHARS: Final = 60 * 1024

# Keys go-plugin interprets itself; a user field must never replace them.
_RESERVED: Final = frozenset({"@message", "@level", "@timestamp", "@module"})
_TRUNCATED: Final = "...[truncated]"

# Go decodes JSON numbers into float64, which is exact only up to 2**53.
_MAX_EXACT_JSON_INT: Final = 2**53

JSONScalar = str | int | float | bool | None


def parse_log_level(name: str) -> int:
    """Map a Nomad ``log_level`` name (trace, debug, info, warn, error, off) to a Python level."""
    level = NOMAD_LOG_LEVELS.get(name.strip().lower())
    if level is None:
        choices = ", ".join(NOMAD_LOG_LEVELS)
        raise ConfigError("log_level", f"unknown log level {name!r}; expected one of {choices}")
    return level


def hclog_level(levelno: int) -> str:
    """hclog level name for a Python level; levels between the named ones round down."""
    if levelno >= logging.ERROR:
        return "error"  # hclog has no critical level
    if levelno >= logging.WARNING:
        return "warn"
    if levelno >= logging.INFO:
        return "info"
    if levelno >= logging.DEBUG:
        return "debug"
    return "trace"


def fields(**values: object) -> dict[str, object]:
    """Build the ``extra`` argument carrying key/value pairs: ``extra=fields(task_id=tid)``."""
    return {"fields": values}


def format_timestamp(created: float) -> str:
    """Format a POSIX time in Go layout ``2006-01-02T15:04:05.000000Z07:00``, always in UTC.

    Done by hand because ``isoformat()`` drops the fraction when microseconds are 0 and
    ``%Y`` is not zero-padded on every platform; Go insists on the exact shape.
    """
    t = datetime.fromtimestamp(created, UTC)
    return (
        f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}"
        f".{t.microsecond:06d}Z"
    )


def _to_str(value: object) -> str:
    """str() that never raises: a broken __str__ must not lose the log record."""
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def json_safe(value: object) -> JSONScalar:
    """Reduce any value to something ``json.dumps`` accepts and Go decodes without loss."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value) if abs(value) <= _MAX_EXACT_JSON_INT else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # JSON has no NaN/Infinity
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {_to_str(value)}"
    return _to_str(value)


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:
        # Mismatched %-arguments; keep the template and the arguments instead of losing both.
        return f"{_to_str(record.msg)} (unformattable log arguments: {_to_str(record.args)})"


class HclogJSONFormatter(logging.Formatter):
    """Formats a record as one hclog JSON line (without the trailing newline); never raises."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            return _fit_line(self._payload(record))
        except Exception as exc:
            # Last resort: a record that still satisfies go-plugin rather than no record at all.
            return _fit_line(
                {
                    "@level": "error",
                    "@message": f"log record could not be formatted: {json_safe(exc)}",
                    "@module": _to_str(getattr(record, "name", "")),
                    "@timestamp": format_timestamp(getattr(record, "created", 0.0)),
                }
            )

    def _payload(self, record: logging.LogRecord) -> dict[str, JSONScalar]:
        payload: dict[str, JSONScalar] = {
            "@level": hclog_level(record.levelno),
            "@message": _message(record),
            "@module": record.name,
            "@timestamp": format_timestamp(record.created),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, Mapping):
            for key, value in extra.items():
                name = _to_str(key)
                payload["_" + name if name in _RESERVED else name] = json_safe(value)
        if record.exc_info and record.exc_info[0] is not None:
            payload[_free_key(payload, "error")] = self.formatException(record.exc_info)
        elif record.exc_text:
            payload[_free_key(payload, "error")] = record.exc_text
        if record.stack_info:
            payload[_free_key(payload, "stacktrace")] = self.formatStack(record.stack_info)
        return payload


def _free_key(payload: Mapping[str, object], key: str) -> str:
    """``key``, or a suffixed variant if a user field already took it."""
    candidate, n = key, 1
    while candidate in payload:
        n += 1
        candidate = f"{key}_{n}"
    return candidate


def _fit_line(payload: dict[str, JSONScalar]) -> str:
    """Serialise, shortening the longest strings until the line fits go-plugin's buffer."""
    for _ in range(8):
        # ensure_ascii: lone surrogates (e.g. from undecodable paths) become escapes Go accepts.
        line = json.dumps(payload, ensure_ascii=True, allow_nan=False)
        excess = len(line) - MAX_LINE_CHARS
        if excess <= 0:
            return line
        trimmable = [k for k, v in payload.items() if isinstance(v, str) and k != "@timestamp"]
        key = max(trimmable, key=lambda k: len(str(payload[k])))
        text = str(payload[key])
        # Escapes make the JSON at least as long as the text, so cutting `excess` characters
        # of text removes at least `excess` characters of JSON.
        payload[key] = text[: max(0, len(text) - excess - len(_TRUNCATED))] + _TRUNCATED
    # Thousands of fields: keep only what go-plugin needs.
    essentials = {k: payload[k] for k in sorted(_RESERVED) if k in payload}
    essentials["@message"] = str(essentials.get("@message", ""))[:1000] + _TRUNCATED
    return json.dumps(essentials, ensure_ascii=True, allow_nan=False)


class SafeFdHandler(logging.Handler):
    """Writes one line per record to a file descriptor it owns, and never raises.

    When the descriptor fails (EPIPE once the Nomad agent has died, EBADF, EIO) it is closed
    and later records go to ``fallback_path`` (appended) if given, else are dropped silently.
    Nothing is reported: the only place to report to is the stderr that just broke.
    """

    def __init__(self, fd: int | None, *, fallback_path: str | None = None) -> None:
        super().__init__()
        self._fd = fd
        self.fallback_path = fallback_path
        self._fallback: BinaryIO | None = None
        self._fallback_failed = False

    @property
    def fd(self) -> int | None:
        """The descriptor still written to, or None once it failed or the handler closed."""
        return self._fd

    def emit(self, record: logging.LogRecord) -> None:
        # logging.Handler.handle holds self.lock around emit, so writes do not interleave.
        try:
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
            self._write(data)
        except Exception:
            pass  # deliberately not handleError(): it prints a traceback to stderr

    def _write(self, data: bytes) -> None:
        if self._fd is not None:
            try:
                _write_all(self._fd, data)
                return
            except BlockingIOError:
                return  # non-blocking stderr momentarily full: drop this record only
            except OSError:
                self._drop_fd()
        self._write_fallback(data)

    def _drop_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _write_fallback(self, data: bytes) -> None:
        if self.fallback_path is None or self._fallback_failed:
            return
        try:
            if self._fallback is None:
                self._fallback = open(self.fallback_path, "ab", buffering=0)  # noqa: SIM115
            self._fallback.write(data)
        except OSError:
            # Unwritable path: stop trying, or every record would retry the open.
            self._fallback_failed = self._fallback is None

    def close(self) -> None:
        self.acquire()  # an emit in another thread must not write to a closed fd
        try:
            self._drop_fd()
            if self._fallback is not None:
                with contextlib.suppress(OSError):
                    self._fallback.close()
                self._fallback = None
        finally:
            self.release()
        super().close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def configure_plugin_logging(level: str = "debug") -> None:
    """Send all Python logging to the process's original stderr as hclog JSON lines.

    Replaces every handler on the root logger (a plugin process owns its logging, and a stray
    stdout handler would corrupt the go-plugin handshake), writes through a duplicate of fd 2
    taken now (so later redirection of fd 2 does not matter), and routes ``warnings`` into
    logging. ``level`` is a Nomad log_level name; see :func:`parse_log_level`. If env
    ``NOMAD_VM_LOG_FILE`` is set, records are appended there once stderr is broken.
    """
    threshold = parse_log_level(level)
    try:
        fd: int | None = os.dup(2)  # os.dup returns a non-inheritable fd: VMMs do not get it
    except OSError:
        fd = None  # stderr closed at startup: only the fallback file, if any, remains
    handler = SafeFdHandler(fd, fallback_path=os.environ.get(LOG_FILE_ENV) or None)
    handler.setFormatter(HclogJSONFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if isinstance(old, SafeFdHandler):
            old.close()  # ours from an earlier call: release its fd
    root.addHandler(handler)
    root.setLevel(threshold)
    logging.captureWarnings(True)
