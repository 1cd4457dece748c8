"""structlog set-up: JSON lines on stdout (console rendering on a terminal).

One line per request comes from the V2 middleware; aiohttp's own access log is off. JSON lines
are written without a flush each (a syscall per request is a measurable share of a poll's cost);
`flush_periodically` in the app flushes them within half a second, and at shutdown.
"""

from __future__ import annotations

import asyncio
import atexit
import io
import logging
import sys
import time
from collections.abc import AsyncIterator
from functools import lru_cache
from typing import Any, BinaryIO, Literal

import orjson
import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
FLUSH_EVERY = 0.5
_stream: BinaryIO | None = None


def _timestamp(_logger: object, _name: str, event: dict) -> dict:
    """ISO 8601 UTC with microseconds, like structlog's TimeStamper, formatting each second once."""
    now = time.time()
    seconds = int(now)
    event["timestamp"] = f"{_second(seconds)}.{int((now - seconds) * 1e6):06d}Z"
    return event


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


def configure(fmt: Literal["auto", "json", "console"] = "auto", level: str = "info",
              stream: BinaryIO | None = None, cache: bool = True) -> None:
    """Configure structlog process-wide; `stream` (binary) defaults to stdout, buffered.

    `cache=False` lets a later call (tests) reconfigure loggers that were already used.
    """
    global _stream
    console = fmt == "console" or (fmt == "auto" and (stream or sys.stdout).isatty())
    processors: list[Any] = [structlog.processors.add_log_level, _timestamp]
    if console:  # for people: each line at once
        processors.append(structlog.dev.ConsoleRenderer())
        text = sys.stdout if stream is None else io.TextIOWrapper(stream, write_through=True)
        factory: Any = structlog.PrintLoggerFactory(text)
    else:
        if stream is None:
            # our own buffer over stdout: sys.stdout.buffer is unbuffered under PYTHONUNBUFFERED=1,
            # which containers often set, and a write per line is a syscall per request
            stream = io.BufferedWriter(io.FileIO(sys.stdout.fileno(), "wb", closefd=False), 64 * 1024)
            atexit.register(stream.flush)
        _stream = stream
        processors += [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ]
        factory = lambda *_: _LineLogger(stream)  # noqa: E731
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=cache,
    )
    # libraries that use stdlib logging (aiohttp's server errors) go to stderr, warnings and up
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, force=True)


def flush() -> None:
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
