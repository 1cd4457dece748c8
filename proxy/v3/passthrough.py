"""V3 pass-through: `/v3/*` forwarded to the upstream unchanged, streamed both ways, so clients can
move one call at a time to V3 without changing their base URL."""

from __future__ import annotations

import time

import aiohttp
import orjson
import structlog
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.keys import METRICS, SESSION, UPSTREAM_URL

# RFC 9110 section 7.6.1, plus what aiohttp sets itself for each hop
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade", "host",
})
CHUNK = 64 * 1024
log = structlog.get_logger("proxy")


def _end_to_end(headers: CIMultiDict | dict) -> CIMultiDict:
    listed = {h.strip().lower() for h in headers.get("Connection", "").split(",") if h.strip()}
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP | listed)


def _error(status: int, reason: str, message: str) -> web.Response:
    body = {"code": status, "reason": reason, "message": message, "metadata": {}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


async def passthrough(request: web.Request) -> web.StreamResponse:
    app = request.app
    metrics = app[METRICS]
    url = URL(app[UPSTREAM_URL] + request.rel_url.raw_path_qs, encoded=True)  # bytes as the client sent them
    body = request.content if request.body_exists else None
    started = time.perf_counter()
    response: web.StreamResponse | None = None
    metrics.in_flight.inc()
    try:
        async with app[SESSION].request(
            request.method, url, headers=_end_to_end(request.headers), data=body,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            auto_decompress=False, allow_redirects=False,
        ) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                          headers=_end_to_end(upstream.headers))
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(CHUNK):
                await response.write(chunk)
            await response.write_eof()
    except (TimeoutError, aiohttp.ClientError) as e:
        if response is not None and response.prepared:
            raise  # mid-stream: nothing sane left to send; the connection is closed
        # aiohttp's words name the upstream's address: for the log, not for the client
        log.warning("v3 pass-through failed", method=request.method, path=request.path, detail=repr(e))
        if isinstance(e, TimeoutError):
            response = _error(504, "GATEWAY_TIMEOUT", "the upstream did not answer in time")
        else:
            response = _error(502, "UPSTREAM_UNAVAILABLE", "the upstream could not be reached")
    finally:
        metrics.in_flight.dec()
        metrics.observe_upstream("passthrough", time.perf_counter() - started)
    metrics.v3_passthrough.labels(request.method, response.status).inc()
    return response
