"""structlog set-up: JSON lines on stdout (console rendering on a terminal).

One line per request comes from the V2 edge (`audit`: in JSON, rendered once with orjson, with no
processor chain); aiohttp's own access log is off. JSON lines are written without a flush each (a syscall per request is a measurable share of a poll's cost);
`flush_periodically` in the app flushes them within half a second, and at shutdown.

Audit events (`v2.deprecated_call`) are written whatever the level: `--log-level warning` quiets
the rest, never the audit trail. Every other event goes through `redact`, so a bearer token in
what a library or upstream said never reaches the log.

Libraries log through stdlib logging (aiohttp's server errors, asyncio's). Those records go through
`LibraryLogs`: one short line each, through the same renderer, without the exception's text or
traceback (a malformed request's exception quotes the raw header bytes, keys included), and at
most `LIBRARY_LINES` lines per `LIBRARY_WINDOW` seconds, then one line counting the ones left out:
a client sending garbage can't flood the log.
"""

from __future__ import annotations

import asyncio
import atexit
import io
import ipaddress
import logging
import os
import select
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from functools import lru_cache
from pathlib import PurePath
from typing import Any, BinaryIO, Literal

import orjson
import structlog

from proxy.audit import EVENT as AUDIT_EVENT
from proxy.redact import redact

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
FLUSH_EVERY = 0.5
ALWAYS_WRITTEN = frozenset({AUDIT_EVENT})  # info events written at any level
LIBRARY_LINES = 20  # library log lines per window, at most
LIBRARY_WINDOW = 10.0  # seconds
_stream: BinaryIO | None = None
_library: LibraryLogs | None = None


def _timestamp(_logger: object, _name: str, event: dict) -> dict:
    event["timestamp"] = _now()
    return event


def _now() -> str:
    """ISO 8601 UTC with microseconds, like structlog's TimeStamper, formatting each second once."""
    now = time.time()
    seconds = int(now)
    return f"{_second(seconds)}.{int((now - seconds) * 1e6):06d}Z"


@lru_cache(maxsize=2)
def _second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


class _LineLogger:
    """structlog's BytesLogger without the flush per line."""

    def __init__(self, stream: BinaryIO) -> None:
        self._write = stream.write

    def msg(self, message: bytes) -> None:
        self._write(message + b"\n")

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


class _WholeLines(io.RawIOBase):
    """stdout as several processes share it (`serve --workers`): each write is cut at line ends into
    writes of at most PIPE_BUF bytes, which a pipe never interleaves with another process's."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        view, start = memoryview(data), 0
        while start < len(view):
            end = start + select.PIPE_BUF
            if end < len(view):
                cut = bytes(view[start:end]).rfind(b"\n")
                end = start + cut + 1 if cut >= 0 else end  # a line longer than PIPE_BUF goes as it is
            start += os.write(self._fd, view[start:min(end, len(view))])
        return len(view)


def audit(fields: dict) -> None:
    """Write one audit event (`v2.deprecated_call`, one per V2 call) at any level. In JSON, the
    line is rendered once with orjson and written as it is: no processor chain on the hot path (its
    fields are the proxy's own and already redacted). On a console it is a structlog line like any
    other."""
    _audit(fields)


def _structlog_audit(fields: dict) -> None:
    structlog.get_logger("proxy").info(AUDIT_EVENT, **fields)


_audit: Callable[[dict], None] = _structlog_audit


def _json_audit(stream: BinaryIO, shared: bool) -> Callable[[dict], None]:
    write = stream.write

    def audit(fields: dict) -> None:
        line = {"event": AUDIT_EVENT, "level": "info", "timestamp": _now()}
        if shared:
            line["pid"] = os.getpid()
        line.update(fields)
        write(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))

    return audit


def _with_pid(_logger: object, _name: str, event: dict) -> dict:
    event["pid"] = os.getpid()
    return event


def configure(fmt: Literal["auto", "json", "console"] = "auto", level: str = "info",
              stream: BinaryIO | None = None, cache: bool = True, shared: bool = False) -> None:
    """Configure structlog and stdlib logging process-wide; `stream` (binary) defaults to stdout,
    buffered.

    `cache=False` lets a later call (tests) reconfigure loggers that were already used. `shared`:
    several processes write to this stdout (`serve --workers`): each line names its process
    (`pid`), and no line is cut by another's.
    """
    global _stream, _library, _audit
    tty = _isatty(stream or sys.stdout)
    console = fmt == "console" or (fmt == "auto" and tty)
    processors: list[Any] = [structlog.processors.add_log_level, _timestamp]
    if shared:
        processors.append(_with_pid)
    if console:  # for people: each line at once; colours only on a terminal, never into a file
        processors += [_redacted, structlog.dev.ConsoleRenderer(colors=tty)]
        text = sys.stdout if stream is None else io.TextIOWrapper(stream, write_through=True)
        factory: Any = structlog.PrintLoggerFactory(text)
        _audit = _structlog_audit
    else:
        if stream is None:
            # our own buffer over stdout: sys.stdout.buffer is unbuffered under PYTHONUNBUFFERED=1,
            # which containers often set, and a write per line is a syscall per request
            raw = _WholeLines(sys.stdout.fileno()) if shared else io.FileIO(sys.stdout.fileno(), "wb", closefd=False)
            stream = io.BufferedWriter(raw, 64 * 1024)
            atexit.register(stream.flush)
        _stream = stream
        processors += [
            structlog.processors.format_exc_info,
            _redacted,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ]
        factory = lambda *_: _LineLogger(stream)
        _audit = _json_audit(stream, shared)
    structlog.configure(
        processors=processors,
        wrapper_class=_wrapper_class(LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=cache,
    )
    # libraries that use stdlib logging (aiohttp's server errors, asyncio's): one short line each
    _library = LibraryLogs(max(logging.WARNING, LEVELS[level]))
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    root.addHandler(_library)
    root.setLevel(_library.level)


def _isatty(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError, OSError):  # no such method, or a closed stream
        return False


@lru_cache
def _wrapper_class(min_level: int) -> type:
    """structlog's filtering logger for `min_level`, except that the events in ALWAYS_WRITTEN are
    written whatever the level (at info, the level they are logged at)."""
    base = structlog.make_filtering_bound_logger(min_level)
    if min_level <= logging.INFO:
        return base

    def info(self: Any, event: str, *args: Any, **kw: Any) -> Any:
        if event in ALWAYS_WRITTEN:
            return self._proxy_to_logger("info", event, **kw)
        return None

    return type(f"{base.__name__}KeepingAudit", (base,), {"info": info, "msg": info})


def _redacted(_logger: object, _name: str, event: dict) -> dict:
    """No bearer token in a line, whatever a library or upstream put in it. The audit event, one
    per request, is made of the proxy's own fields and already redacted text: it is left alone."""
    if event.get("event") in ALWAYS_WRITTEN:
        return event
    for name, value in event.items():
        if isinstance(value, str):
            event[name] = redact(value)
    return event


class LibraryLogs(logging.Handler):
    """stdlib log records -> one short structlog line each, rate-limited.

    A line keeps the logger's name, the message's template with only numbers and IP addresses put
    in, the exception's class, its HTTP status and the first words of its reason when it is one of
    aiohttp's HTTP errors, and where it was raised (file:line, no values). It never keeps the
    exception's text nor its traceback, which may quote a request's bytes (an Authorization header).
    """

    def __init__(self, level: int = logging.WARNING, max_lines: int = LIBRARY_LINES,
                 window: float = LIBRARY_WINDOW, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(level)
        self._max, self._window, self._clock = max_lines, window, clock
        self._since = -float("inf")
        self._written = 0
        self._suppressed = 0
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._guard:
            self._roll()
            if self._written >= self._max:
                self._suppressed += 1
                return
            self._written += 1
        try:
            fields = _library_fields(record)
        except Exception:  # noqa: BLE001 (a line that can't be made safely is cut to the logger name)
            fields = {"logger": record.name}
        structlog.get_logger("library").log(_level(record.levelno), fields.pop("event", "library log"), **fields)

    def flush(self) -> None:
        """Write the count of suppressed lines once their window is over."""
        with self._guard:
            self._roll()

    def handleError(self, record: logging.LogRecord) -> None:
        pass  # logging's own report prints the record's message and arguments to stderr

    def _roll(self) -> None:
        now = self._clock()
        if now - self._since < self._window:
            return
        if self._suppressed:
            structlog.get_logger("library").log(
                _level(self.level), "library log lines suppressed", suppressed=self._suppressed,
                window_s=self._window)
        self._since, self._written, self._suppressed = now, 0, 0


def _level(levelno: int) -> int:
    """A standard level (structlog knows no other), at least the handler's own."""
    return min(max(levelno // 10 * 10, logging.DEBUG), logging.CRITICAL)


def _library_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {"event": _template(record), "logger": record.name}
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        fields["error"] = type(exc).__qualname__
        code = getattr(exc, "code", None)
        if isinstance(code, int) and not isinstance(code, bool):
            fields["status"] = code
        message = getattr(exc, "message", None)
        if isinstance(message, str) and type(exc).__module__.startswith("aiohttp"):
            fields["reason"] = _first_words(message)
        frames = traceback.extract_tb(exc.__traceback__)[-3:]
        fields["where"] = " < ".join(
            f"{'/'.join(PurePath(f.filename).parts[-2:])}:{f.lineno} {f.name}" for f in reversed(frames))
    return fields


def _template(record: logging.LogRecord) -> str:
    """The first line of the message, with only numbers and IP addresses as its arguments."""
    template = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
    if record.args and isinstance(record.args, tuple):
        try:
            template = template % tuple(_safe_arg(a) for a in record.args)
        except (TypeError, ValueError):
            pass
    return template.split("\n", 1)[0][:200]


def _safe_arg(value: object) -> object:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            pass
    return "..."


def _first_words(message: str) -> str:
    """`Invalid header value char` of `Invalid header value char:\n\n  b'Authorization: ...'`: the
    words before anything quoted."""
    words = message.split("\n", 1)[0]
    for stop in (":", "'", '"', "b'", "\\"):
        words = words.split(stop, 1)[0]
    return words.strip()[:80]


def flush() -> None:
    if _library is not None:
        _library.flush()
    if _stream is not None:
        _stream.flush()


async def flush_periodically(_app: object) -> AsyncIterator[None]:
    """cleanup_ctx: flush log lines every FLUSH_EVERY seconds while the app runs, and at the end."""

    async def loop() -> None:
        while True:
            flush()
            await asyncio.sleep(FLUSH_EVERY)

    job = asyncio.create_task(loop())
    yield
    job.cancel()
    flush()
