"""The V2 edge: every answered /v2 request becomes a V2 body with the deprecation headers, and
one audit event (`v2.deprecated_call`); brownouts refuse calls here, before any handler runs.

Errors are values with a V2 code (V2Error), turned into a body here and nowhere else. Anything
unexpected is logged with its traceback and answered with code -1, never shown to the client.
"""

from __future__ import annotations

import time

import structlog
from aiohttp import web

from proxy.deprecation import BrownoutRefusal
from proxy.errors import V2Code, V2Error
from proxy.fingerprint import fingerprint
from proxy.keys import BROWNOUTS, DEPRECATION, FINGERPRINT, LOG_FIELDS, METRICS, SECRET
from proxy.v2.auth import find_key
from proxy.v2.reply import v2_reply

log = structlog.get_logger("proxy")

# aiohttp's own HTTP errors on /v2 paths, as V2 codes
_HTTP_ERRORS = {
    404: (V2Code.NOT_SUPPORT, "no such V2 endpoint"),
    405: (V2Code.NOT_SUPPORT, "method not allowed on this V2 endpoint"),
    413: (V2Code.PARAM_RANGE_OUT_OF_LIMIT, "request body too large"),
}


def _from_http_error(e: web.HTTPException) -> V2Error:
    code, msg = _HTTP_ERRORS.get(e.status, (V2Code.INVALID_JSON, e.reason))
    return V2Error(code, f"{msg} (HTTP {e.status})" if e.status == 413 else msg)


@web.middleware
async def v2_edge(request: web.Request, handler) -> web.StreamResponse:
    if not (request.path.startswith("/v2/") or request.path == "/v2"):
        return await handler(request)
    started = time.perf_counter()
    app = request.app
    metrics = app[METRICS]
    key = find_key(request)
    fp = request[FINGERPRINT] = fingerprint(key, app[SECRET]) if key else None
    fields = request[LOG_FIELDS] = {}
    endpoint = request.match_info.route.name
    code = V2Code.NORMAL
    metrics.in_flight.inc()
    try:
        app[BROWNOUTS].check(fp)
        response = await handler(request)
    except web.HTTPException as e:
        err = _from_http_error(e)
        code, response = err.code, v2_reply(err.code, err.msg)
    except V2Error as e:
        code, response = e.code, v2_reply(e.code, e.msg, status=e.http_status)
        fields.setdefault("path_taken", "brownout" if isinstance(e, BrownoutRefusal) else "refused")
        fields.update(msg=e.msg, upstream_status=e.upstream_status)
    except Exception:
        code, response = V2Code.INTERNAL_ERROR, v2_reply(V2Code.INTERNAL_ERROR, "internal error")
        log.exception("unexpected error", method=request.method, path=request.path)
    finally:
        metrics.in_flight.dec()
    app[DEPRECATION].apply(response.headers, endpoint)
    path_taken = fields.pop("path_taken", "refused" if code else "direct")
    metrics.count_v2_call(endpoint or "unknown", path_taken, int(code), fp)
    log.info(
        "v2.deprecated_call", method=request.method, path=request.path, endpoint=endpoint,
        fingerprint=fp, user_agent=request.headers.get("User-Agent", ""), path_taken=path_taken,
        v2_code=int(code), latency_ms=round((time.perf_counter() - started) * 1000, 2), **fields,
    )
    return response
