"""The V2 edge: what every /v2 call goes through around its handler, in one visible order. Other
paths (/v3 pass-through, /_proxy, health, metrics) go through none of it.

    the audit record       made first; one `v2.deprecated_call` event per answered call, last,
                           and the call counted for the usage store (proxy/usage/tally.py)
    calls in flight        metrics, around everything below
    deprecation headers    on every V2 response, error bodies included
    map errors             V2Error, V3Error, HTTP errors, anything else -> a V2 body
      the caller           the key and its fingerprint, read once (`request[CALLER]`)
      brownouts            may refuse the call before the handler runs (code 10)
      load shedding        submissions only: code 5 at once past the byte budget or the V3 call
                           cap; code 9 for a body that doesn't arrive in time (proxy/limits.py)
      the handler

Each step is a named function below; `v2_edge` only calls them in this order. It is one
middleware, not a chain of them, and what it needs from the app is looked up once, at start-up
(`EdgeParts`): this runs on every V2 call, and each layer of coroutines or lookup is a measurable
share of a poll's cost (tests/bench).

Errors are values with a V2 code (V2Error) or V3's own (V3Error), turned into a V2 body in
`v2_error` and nowhere else; on /v2/progress that body's `data` is a final failure (status 3, the
message as `failed_reason`), never null. A poll meets few errors: transient faults of V3 or the
store are answered by the handler with the task's last known state (proxy/v2/last_known.py).
Anything unexpected is logged with its traceback and answered with code -1, never shown to the
client.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from proxy import logs
from proxy.deprecation import BrownoutRefusal, Brownouts, Deprecation
from proxy.errors import V2Code, V2Error
from proxy.fingerprint import Fingerprinter
from proxy.keys import AUDIT, CALLER, Caller
from proxy.limits import Limits, Overloaded
from proxy.mappings import ErrorTable
from proxy.metrics import Metrics
from proxy.migration.router import SERVED_BY_HEADER
from proxy.redact import redact
from proxy.translate.errors import to_v2_error
from proxy.translate.progress import failed_progress
from proxy.usage.tally import Tallies
from proxy.v2.audit_record import AuditRecord
from proxy.v2.auth import find_key
from proxy.v2.reply import v2_reply
from proxy.v3.errors import V3Error

log = structlog.get_logger("proxy")

# aiohttp's own HTTP errors on /v2 paths, as V2 codes
_HTTP_ERRORS = {
    404: (V2Code.NOT_SUPPORT, "no such V2 endpoint"),
    405: (V2Code.NOT_SUPPORT, "method not allowed on this V2 endpoint"),
    413: (V2Code.PARAM_RANGE_OUT_OF_LIMIT, "request body too large"),
}


@dataclass(frozen=True, slots=True)
class EdgeParts:
    """What the edge uses from the app, gathered once when the app has started."""

    fingerprint: Fingerprinter
    metrics: Metrics
    deprecation: Deprecation
    brownouts: Brownouts
    limits: Limits
    errors: ErrorTable
    usage: Tallies
    # with a legacy V2: the migration's look at each answered call (proxy/migration/service.py)
    after_call: Callable[[str | None, str | None, int, str | None, int | None], None] | None = None


EDGE = web.AppKey("edge", EdgeParts)


@web.middleware
async def v2_edge(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The steps of the module docstring, in its order, around each /v2 handler."""
    path = request.path
    if not path.startswith("/v2/") and path != "/v2":
        return await handler(request)
    parts = request.app[EDGE]
    endpoint = request.match_info.route.name  # upscale, progress, images; None: no such endpoint
    audit = request[AUDIT] = AuditRecord(request.method, path, endpoint,
                                         _printable(request.headers.get("User-Agent", "")), time.perf_counter())
    metrics = parts.metrics
    metrics.calls_in_flight += 1
    try:
        try:
            caller = request[CALLER] = identify_caller(request, parts.fingerprint)
            audit.fingerprint = caller.fingerprint
            check_brownouts(parts.brownouts, caller, audit)
            if endpoint == "upscale":
                response = await shed_load(request, handler, parts.limits, audit)
            else:
                response = await handler(request)
        except Exception as e:  # every error becomes a V2 body, here and nowhere else
            response = v2_error(request, e, audit, parts.errors)
        parts.deprecation.apply(response.headers, endpoint)
        response.headers[SERVED_BY_HEADER] = audit.served_by or "v3"
    finally:
        metrics.calls_in_flight -= 1
    metrics.count_v2_call(endpoint or "unknown", audit.final_path, audit.v2_code, audit.fingerprint)
    logs.audit(audit.event(time.perf_counter()))
    parts.usage.v2_call(audit.fingerprint, endpoint or "unknown", audit.v2_code, audit.user_agent,
                        audit.features, audit.v3_jobs or 0, audit.shape)
    if parts.after_call is not None and endpoint in ("upscale", "progress"):
        parts.after_call(audit.fingerprint, audit.served_by, audit.v2_code, audit.task_id, audit.task_status)
    return response


def _printable(header: str) -> str:
    """A header as text that can be logged: aiohttp decodes bytes that aren't UTF-8 into lone
    surrogates, which no JSON encoder takes; they become backslash escapes."""
    try:
        header.encode()
        return header
    except UnicodeEncodeError:
        return header.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def identify_caller(request: web.Request, fingerprint: Fingerprinter) -> Caller:
    """Read the key once; from here on, `request[CALLER]` has it and its fingerprint."""
    key = find_key(request)
    return Caller(key, fingerprint(key) if key else None)


def check_brownouts(brownouts: Brownouts, caller: Caller, audit: AuditRecord) -> None:
    """Inside a brownout window, refuse the call (code 10, never HTTP 429) before any handler runs."""
    try:
        brownouts.check(caller.fingerprint)
    except BrownoutRefusal:
        audit.path_taken = "brownout"
        raise


async def shed_load(request: web.Request, handler: Handler, limits: Limits,
                    audit: AuditRecord) -> web.StreamResponse:
    """Submissions: code 5 at once past the process's budget of bytes in flight or its cap on calls
    waiting on V3, before the body is read; code 9 for a body that doesn't arrive in time
    (proxy/limits.py). Polls are cheap and never shed."""
    try:
        let_go = await limits.admit(request)
    except Overloaded:
        audit.path_taken = "shed"
        raise
    try:
        return await handler(request)
    finally:
        let_go()


def v2_error(request: web.Request, e: Exception, audit: AuditRecord, errors: ErrorTable) -> web.Response:
    """Any error, whatever raised it, as a V2 body (HTTP 200 unless V2 said otherwise)."""
    if isinstance(e, web.HTTPException):
        err = _from_http_error(e)
    elif isinstance(e, V3Error):
        err = _from_v3_error(request, e, errors)
    elif isinstance(e, V2Error):
        err = e
    else:
        log.exception("unexpected error", method=request.method, path=request.path)  # called in `except`
        err = V2Error(V2Code.INTERNAL_ERROR, "internal error")
    audit.v2_code, audit.msg = int(err.code), err.msg
    if err.feature is not None:
        audit.features = {err.feature: "refused"}
    if err.upstream_status is not None:
        audit.upstream_status = err.upstream_status
    # a poll's error still carries progress data: SDK wait loops read data.status whatever the code
    data = failed_progress(err.msg) if audit.endpoint == "progress" else None
    return v2_reply(err.code, err.msg, data, status=err.http_status)


def _from_http_error(e: web.HTTPException) -> V2Error:
    code, msg = _HTTP_ERRORS.get(e.status, (V2Code.INVALID_JSON, e.reason))
    return V2Error(code, f"{msg} (HTTP {e.status})" if e.status == 413 else msg)


def _from_v3_error(request: web.Request, e: V3Error, errors: ErrorTable) -> V2Error:
    """Through the error table; the key that went upstream is redacted from what V3 said."""
    log_v3_failure(request, e)
    caller = request.get(CALLER)
    return to_v2_error(e, errors, caller.key if caller else None)


def log_v3_failure(request: web.Request, e: V3Error) -> None:
    """What aiohttp or the parser said of a failed V3 call (an address, ...): for operators only."""
    if e.__cause__ is not None:
        caller = request.get(CALLER)
        log.warning("upstream call failed", method=request.method, path=request.path,
                    error=type(e).__name__, detail=redact(str(e.__cause__), caller.key if caller else None))
