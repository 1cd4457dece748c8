"""The V2 edge: small units, one job each, run around every /v2 handler in the order `V2_EDGE`
in proxy/app.py lists them. Other paths (/v3 pass-through, /_proxy, health, metrics) get none.

A unit is `async def unit(request, handler) -> response` and wraps the units listed after it, so
it may rely on what earlier units put on the request: `audit_event` makes the call's
AuditRecord (`request[AUDIT]`) that the others write to; `identify_caller` reads the key once
(`request[CALLER]`), which `brownouts` and the handlers use.

Errors are values with a V2 code (V2Error) or V3's own (V3Error), turned into a V2 body in
`map_errors` and nowhere else. Anything unexpected is logged with its traceback and answered
with code -1, never shown to the client.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy.audit import EVENT
from proxy.deprecation import BrownoutRefusal
from proxy.errors import V2Code, V2Error
from proxy.fingerprint import fingerprint
from proxy.keys import (
    AUDIT,
    BROWNOUTS,
    CALLER,
    DEPRECATION,
    MAPPINGS,
    METRICS,
    SECRET,
    Caller,
)
from proxy.limits import LIMITS, Overloaded
from proxy.redact import redact
from proxy.translate.errors import to_v2_error
from proxy.v2.audit_record import AuditRecord
from proxy.v2.auth import find_key
from proxy.v2.reply import v2_reply
from proxy.v3.errors import V3Error

Unit = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]
log = structlog.get_logger("proxy")

# aiohttp's own HTTP errors on /v2 paths, as V2 codes
_HTTP_ERRORS = {
    404: (V2Code.NOT_SUPPORT, "no such V2 endpoint"),
    405: (V2Code.NOT_SUPPORT, "method not allowed on this V2 endpoint"),
    413: (V2Code.PARAM_RANGE_OUT_OF_LIMIT, "request body too large"),
}


def v2_edge(units: Sequence[Unit]) -> Middleware:
    """One aiohttp middleware running `units`, the first outermost, around each /v2 handler."""
    inner_first = tuple(reversed(units))

    @web.middleware
    async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not (request.path.startswith("/v2/") or request.path == "/v2"):
            return await handler(request)
        for unit in inner_first:
            handler = partial(unit, handler=handler)
        return await handler(request)

    return edge


async def audit_event(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One `v2.deprecated_call` event per answered call, telling how it ended."""
    audit = request[AUDIT] = AuditRecord(request.method, request.path, request.match_info.route.name,
                                         _printable(request.headers.get("User-Agent", "")), time.perf_counter())
    response = await handler(request)
    log.info(EVENT, **audit.event(time.perf_counter()))
    return response


def _printable(header: str) -> str:
    """A header as text that can be logged: aiohttp decodes bytes that aren't UTF-8 into lone
    surrogates, which no JSON encoder takes; they become backslash escapes."""
    try:
        header.encode()
        return header
    except UnicodeEncodeError:
        return header.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


async def count_call(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Metrics: calls in flight, and calls by endpoint, path taken, V2 code and client."""
    metrics = request.app[METRICS]
    metrics.in_flight.inc()
    try:
        response = await handler(request)
    finally:
        metrics.in_flight.dec()
    audit = request[AUDIT]
    metrics.count_v2_call(audit.endpoint or "unknown", audit.final_path, audit.v2_code, audit.fingerprint)
    return response


async def deprecation_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Deprecation, Sunset and Link on every V2 response, errors included."""
    response = await handler(request)
    request.app[DEPRECATION].apply(response.headers, request.match_info.route.name)
    return response


async def map_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error, whatever raised it, becomes a V2 body here (HTTP 200 unless V2 said otherwise)."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        err = _from_http_error(e)
    except V3Error as e:
        err = _from_v3_error(request, e)
    except V2Error as e:
        err = e
    except Exception:
        log.exception("unexpected error", method=request.method, path=request.path)
        err = V2Error(V2Code.INTERNAL_ERROR, "internal error")
    audit = request[AUDIT]
    audit.v2_code, audit.msg = int(err.code), err.msg
    if err.upstream_status is not None:
        audit.upstream_status = err.upstream_status
    return v2_reply(err.code, err.msg, status=err.http_status)


def _from_http_error(e: web.HTTPException) -> V2Error:
    code, msg = _HTTP_ERRORS.get(e.status, (V2Code.INVALID_JSON, e.reason))
    return V2Error(code, f"{msg} (HTTP {e.status})" if e.status == 413 else msg)


def _from_v3_error(request: web.Request, e: V3Error) -> V2Error:
    """Through the error table; the key that went upstream is redacted from what V3 said."""
    caller = request.get(CALLER)
    key = caller.key if caller else None
    if e.__cause__ is not None:  # what aiohttp or the parser said (an address, ...): for operators only
        log.warning("upstream call failed", method=request.method, path=request.path,
                    error=type(e).__name__, detail=redact(str(e.__cause__), key))
    return to_v2_error(e, request.app[MAPPINGS].errors, key)


async def identify_caller(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Read the key once; from here on, `request[CALLER]` has it and its fingerprint."""
    key = find_key(request)
    fp = fingerprint(key, request.app[SECRET]) if key else None
    request[CALLER] = Caller(key, fp)
    request[AUDIT].fingerprint = fp
    return await handler(request)


async def brownouts(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Inside a brownout window, refuse the call (code 10, never HTTP 429) before any handler runs."""
    try:
        request.app[BROWNOUTS].check(request[CALLER].fingerprint)
    except BrownoutRefusal:
        request[AUDIT].path_taken = "brownout"
        raise
    return await handler(request)


async def shed_load(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Submissions only: code 5 at once past the process's budget of bytes in flight or its cap on
    calls waiting on V3, before the body is read; code 9 for a body that doesn't arrive in time
    (proxy/limits.py). Polls are cheap and never shed."""
    if request.match_info.route.name != "upscale":
        return await handler(request)
    try:
        async with request.app[LIMITS].submission(request):
            return await handler(request)
    except Overloaded:
        request[AUDIT].path_taken = "shed"
        raise
