"""What keeps one proxy process standing under hostile input and overload.

- A deadline for a request's body (`UPSCALE_PROXY_REQUEST_TIMEOUT`): a client that declares
  48 MB, sends part of it and stalls is answered once it passes (code 9), and what it sent is
  freed. (Headers that never end are aiohttp's: `keepalive_timeout` closes such a connection.)
- A budget of request bytes in flight across the process (`UPSCALE_PROXY_MAX_INFLIGHT_MB`): a
  body whose Content-Length would go past it is refused at once (code 5), before it is read; a
  chunked body counts as it arrives and is refused where it crosses the budget. A body's bytes
  count until its answer is made.
- A cap on submissions waiting on V3 at once (`UPSCALE_PROXY_MAX_UPSTREAM_CALLS`): past it, code 5
  at once, instead of a queue (of bodies, in memory) behind the upstream connection pool.

A refusal is code 5, "the proxy is overloaded ..., retry": a fast answer an SDK retries beats a
queue that grows until the process is killed. Every request body goes through the first two, and
every submission through the cap too: V2 submissions (`admit`, the `shed_load` unit of the V2 edge:
the body read whole), /v3 pass-through calls with a body (`stream`: the body passed on as it
arrives), and `POST /_proxy/translate`, which calls no one, so no cap (`read_body`). The refusals
are V2 errors; the pass-through answers them in V3's words. Polls have no body and keep answering
under load.

While a load lasts, glibc keeps the memory freed bodies were in (`keep_freed_memory`: no fresh
page faults for the next body); once it has passed, that memory goes back to the OS
(`trim_memory`): glibc keeps the heap it grew for the bodies otherwise (measured with tests/bench/load.py: 63 MB of RSS before a
load, about 400 MB at its peak, still 343 MB an idle minute later; 66 MB with the trim).

One event loop owns these counters: no locks.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import TypeVar

import structlog
from aiohttp import web

from proxy.errors import V2Code, V2Error

MiB = 1024 * 1024
T = TypeVar("T")
log = structlog.get_logger("proxy")


class Overloaded(V2Error):
    """Code 5: past one of the process's limits. Nothing was sent upstream; the client may retry."""

    def __init__(self, limit: str, why: str) -> None:
        super().__init__(V2Code.HOST_UNAVAILABLE, f"the proxy is overloaded ({why}), retry")
        self.limit = limit  # the metric's label: bytes | upstream_calls


class BodyTimeout(V2Error):
    """Code 9: the request's body did not arrive before the deadline; what came is let go."""

    def __init__(self, seconds: float) -> None:
        super().__init__(V2Code.TIMEOUT, f"the request body did not arrive within {seconds:g} s")


class Limits:
    """The process's budget of request bytes in flight, its body deadline, and its cap on
    submissions waiting on V3."""

    def __init__(self, max_bytes: int, max_upstream_calls: int, body_timeout: float,
                 on_refusal: Callable[[str], None] | None = None) -> None:
        self.max_bytes, self.max_upstream_calls, self.body_timeout = max_bytes, max_upstream_calls, body_timeout
        self.bytes_in_flight = 0
        self.upstream_calls = 0
        self.bytes_since_trim = 0  # taken since freed memory was last given back
        self._on_refusal = on_refusal or (lambda limit: None)

    @property
    def idle(self) -> bool:
        return self.bytes_in_flight == 0 and self.upstream_calls == 0

    async def admit(self, request: web.Request) -> Callable[[], None]:
        """Admit a submission: its body (`read_body`), then a place among the calls waiting on V3.
        -> the function that lets both go, to be called once whatever happens next. Refused with
        Overloaded (code 5), BodyTimeout (code 9) or HTTP 413 (too large)."""
        self._check_calls()
        counted = await self._read(request)
        try:
            self._check_calls()  # it may have filled while the body came
        except BaseException:
            counted.release()
            raise
        self.upstream_calls += 1
        return partial(self._let_go, counted)

    async def read_body(self, request: web.Request) -> Callable[[], None]:
        """Read a request's body under the deadline, counted against the budget; then
        `request.read()` has it. -> the function that lets its bytes go, to be called once its
        answer is made. Refused with Overloaded, BodyTimeout or HTTP 413, as `admit`."""
        return (await self._read(request)).release

    def stream(self, request: web.Request) -> BodyStream:
        """Admit a submission whose body is passed on as it arrives, not read here (the /v3
        pass-through): the same budget, deadline and cap as `admit`, applied while it streams
        (`BodyStream`). Refused at once with Overloaded, or HTTP 413 for a Content-Length larger
        than the whole budget; the V2 body limit (client_max_size) is for bodies held whole."""
        self._check_calls()
        declared = request.content_length
        if declared is not None and declared > self.max_bytes:
            raise web.HTTPRequestEntityTooLarge(self.max_bytes, declared)
        counted = _Counted(self)
        if declared is not None:
            counted.take(declared)
        self.upstream_calls += 1
        return BodyStream(self, request, counted)

    async def _read(self, request: web.Request) -> _Counted:
        declared = request.content_length
        if declared is not None and declared > min(request.client_max_size, self.max_bytes):
            raise web.HTTPRequestEntityTooLarge(min(request.client_max_size, self.max_bytes), declared)
        counted = _Counted(self)
        try:
            if declared is not None:
                counted.take(declared)
                if request.content.is_eof():  # all here already: nothing to wait for
                    await request.read()
                else:
                    await self._in_time(request.read(), self._deadline())
            else:
                await self._in_time(self._read_chunked(request, counted), self._deadline())
        except BaseException:
            counted.release()
            raise
        return counted

    def _let_go(self, counted: _Counted) -> None:
        self.upstream_calls -= 1
        counted.release()

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.body_timeout

    async def _in_time(self, reading: Awaitable[T], deadline: float) -> T:
        """What `reading` gives, if it comes before `deadline` (the loop's clock)."""
        try:
            async with asyncio.timeout_at(deadline):
                return await reading
        except TimeoutError:
            raise BodyTimeout(self.body_timeout) from None

    async def _read_chunked(self, request: web.Request, counted: _Counted) -> None:
        """A body of unknown length, counted as it arrives; then it is the one `request.read()` gives."""
        body = bytearray()
        while chunk := await request.content.readany():
            counted.take(len(chunk))
            body.extend(chunk)
            if len(body) > request.client_max_size:
                raise web.HTTPRequestEntityTooLarge(request.client_max_size, len(body))
        request._read_bytes = bytes(body)  # aiohttp has no public way to hand a body read here to read()

    def _check_calls(self) -> None:
        if self.upstream_calls >= self.max_upstream_calls:
            self._on_refusal("upstream_calls")
            raise Overloaded("upstream_calls", f"{self.upstream_calls} submissions are waiting on V3")

    def _take(self, n: int) -> None:
        if self.bytes_in_flight + n > self.max_bytes:
            self._on_refusal("bytes")
            raise Overloaded("bytes", f"{self.bytes_in_flight // MiB} MiB of request bodies in flight")
        self.bytes_in_flight += n
        self.bytes_since_trim += n


class BodyStream:
    """A submission's body as it arrives, for a caller that passes it on (`Limits.stream`): each
    chunk read under the deadline for the whole body, a chunked body's bytes counted as they come.
    A limit it breaks midway raises from `chunks()`, and is kept as `cut`: whoever consumed the
    chunks (aiohttp's client) may wrap it in an error of its own. `let_go()` once the answer is
    made, whatever happened."""

    def __init__(self, limits: Limits, request: web.Request, counted: _Counted) -> None:
        self._limits, self._request, self._counted = limits, request, counted
        self._deadline = limits._deadline()
        self.cut: Overloaded | BodyTimeout | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        limits, content = self._limits, self._request.content
        counting = self._request.content_length is None  # else taken whole when admitted
        try:
            while chunk := await limits._in_time(content.readany(), self._deadline):
                if counting:
                    self._counted.take(len(chunk))
                yield chunk
        except (Overloaded, BodyTimeout) as e:
            self.cut = e
            raise

    def let_go(self) -> None:
        self._limits._let_go(self._counted)


class _Counted:
    """One body's bytes in the budget, released once, whatever happened."""

    def __init__(self, limits: Limits) -> None:
        self._limits, self.n = limits, 0

    def take(self, n: int) -> None:
        self._limits._take(n)
        self.n += n

    def release(self) -> None:
        self._limits.bytes_in_flight -= self.n
        self.n = 0


LIMITS = web.AppKey("limits", Limits)


def _glibc(name: str) -> Callable[..., int] | None:
    """A glibc function, where the C library has it (not musl, not macOS)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


_TRIM = _glibc("malloc_trim")
_MALLOPT = _glibc("mallopt")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def keep_freed_memory() -> bool:
    """While a load lasts, let glibc keep the memory request bodies were in: by default a freed
    body of megabytes goes back to the kernel at once (munmap, or a trim of the heap's top), and
    the next body pays a page fault for each 4 KiB of it again (about 2,000 per 4 MB submission,
    doubling its latency at c=1 on these machines). `trim_memory` gives it all back once the
    process is idle. The variables glibc reads (MALLOC_MMAP_THRESHOLD_, ...) still win."""
    if _MALLOPT is None or _TRIM is None or any(v.startswith("MALLOC_") for v in os.environ):
        return False
    return bool(_MALLOPT(_M_MMAP_THRESHOLD, 64 * MiB) and _MALLOPT(_M_TRIM_THRESHOLD, 512 * MiB))


async def trim_memory(app: web.Application) -> None:
    """Give memory freed since the last time back to the OS, while no submission is in flight.

    glibc keeps the heap it grew for request bodies (several MB each, above its dynamic mmap
    threshold after the first few) and hands it back only from the top of the heap. malloc_trim
    returns every free page of every arena; run only when idle, it costs the load nothing.
    A periodic job (proxy/app.py), every UPSCALE_PROXY_MEMORY_TRIM_INTERVAL seconds."""
    limits = app[LIMITS]
    if _TRIM is None or not limits.idle or not limits.bytes_since_trim:
        return
    limits.bytes_since_trim = 0
    started = time.perf_counter()
    _TRIM(0)
    log.debug("memory trimmed", ms=round((time.perf_counter() - started) * 1000, 1))
