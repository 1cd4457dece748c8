"""structlog set-up: JSON lines on stdout (console rendering on a terminal).

One line per request comes from the V2 middleware; aiohttp's own access log is off.
"""

from __future__ import annotations

import logging
import sys
from typing import BinaryIO, Literal

import orjson
import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(fmt: Literal["auto", "json", "console"] = "auto", level: str = "info",
              stream: BinaryIO | None = None, cache: bool = True) -> None:
    """Configure structlog process-wide; `stream` (binary) defaults to stdout.

    `cache=False` lets a later call (tests) reconfigure loggers that were already used.
    """
    stream = stream or sys.stdout.buffer
    console = fmt == "console" or (fmt == "auto" and stream.isatty())
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if console:
        import io

        processors.append(structlog.dev.ConsoleRenderer())
        factory = structlog.PrintLoggerFactory(io.TextIOWrapper(stream, write_through=True))
    else:
        processors += [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ]
        factory = structlog.BytesLoggerFactory(stream)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=cache,
    )
    # libraries that use stdlib logging (aiohttp's server errors) go to stderr, warnings and up
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, force=True)
