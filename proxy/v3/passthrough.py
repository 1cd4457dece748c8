"""V3 pass-through: `/v3/*` forwarded to the upstream unchanged, streamed both ways, so clients can
move one call at a time to V3 without changing their base URL.

A request body is under the limits a V2 submission's is (the body deadline, the byte budget, the
cap on calls waiting on V3: proxy/limits.py), applied as it streams; a refusal is answered in V3's
words (`_refusal`), and a body cut midway drops the upstream call.

One exception to the streaming: an error reply (4xx, 5xx) is small, and V3's words may echo the key
they were sent, so it is read whole (up to MAX_ERROR_BODY) and sent on with the key scrubbed
(`redact`).
"""

from __future__ import annotations

import time
import zlib

import aiohttp
import orjson
import structlog
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.headers import end_to_end
from proxy.keys import FINGERPRINT, METRICS, SESSION, UPSTREAM_URL, USAGE
from proxy.limits import LIMITS, BodyStream, BodyTimeout, Overloaded
from proxy.redact import redact

CHUNK = 64 * 1024
MAX_ERROR_BODY = 256 * 1024  # an error reply longer than this is replaced by the proxy's own
log = structlog.get_logger("proxy")


def _request_headers(request: web.Request) -> CIMultiDict:
    """The client's headers for V3. aiohttp hands the handler a gzip or deflate body decoded: it
    goes on decoded, without the encoding and the length that described it as it came."""
    headers = end_to_end(request.headers)
    if headers.get("Content-Encoding", "identity").strip().lower() != "identity":
        headers.popall("Content-Encoding")
        headers.popall("Content-Length", None)
    return headers


def _error(status: int, reason: str, message: str) -> web.Response:
    body = {"code": status, "reason": reason, "message": message, "metadata": {}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _refusal(e: Exception) -> web.Response:
    """A refusal of proxy/limits.py in V3's words. The connection is closed: the rest of a body
    refused before it came is not worth reading to keep it."""
    if isinstance(e, Overloaded):
        response = _error(503, "PROXY_OVERLOADED", e.msg)
    elif isinstance(e, BodyTimeout):
        response = _error(408, "REQUEST_TIMEOUT", e.msg)
    else:  # HTTP 413
        response = _error(413, "REQUEST_BODY_TOO_LARGE", "the request body is too large")
    response.force_close()
    return response


def _caller_key(request: web.Request) -> str | None:
    """The key as the client sent it (Bearer, bare, or X-Omni-Key), to scrub from what comes back."""
    header = request.headers.get("Authorization", "").strip()
    scheme, _, rest = header.partition(" ")
    key = rest.strip() if scheme.lower() == "bearer" else header
    return key or request.headers.get("X-Omni-Key", "").strip() or None


async def _scrubbed_error(upstream: aiohttp.ClientResponse, key: str | None) -> web.Response:
    """An upstream error reply, read whole and sent on without the caller's key; one too long to
    read, or in an encoding the proxy can't read, is replaced by the proxy's own error body."""
    raw = bytearray()
    async for chunk in upstream.content.iter_chunked(CHUNK):
        raw += chunk
        if len(raw) > MAX_ERROR_BODY:
            break
    headers = end_to_end(upstream.headers)
    headers.popall("Content-Length", None)
    encoding = headers.popall("Content-Encoding", ["identity"])[-1].strip().lower()
    body = _decoded(bytes(raw), encoding)
    reason = redact(upstream.reason or "", key) or None
    if body is None:
        return _error(upstream.status, "UPSTREAM_ERROR", "the upstream's error reply could not be passed on")
    return web.Response(status=upstream.status, reason=reason, headers=headers,
                        body=redact(body.decode("latin-1"), key).encode("latin-1"))  # byte for byte, but the key


def _decoded(body: bytes, encoding: str) -> bytes | None:
    """The body as sent before its Content-Encoding; None if too long, or not gzip nor deflate."""
    if encoding in ("gzip", "x-gzip", "deflate"):
        try:
            body = zlib.decompressobj(wbits=47).decompress(body, MAX_ERROR_BODY + 1)  # gzip or zlib header
        except zlib.error:
            return None
    elif encoding != "identity":
        return None
    return body if len(body) <= MAX_ERROR_BODY else None


async def passthrough(request: web.Request) -> web.StreamResponse:
    app = request.app
    body: BodyStream | None = None
    if request.body_exists:
        # A call with a body is a submission, under the limits a V2 one is under (proxy/limits.py),
        # its body still streamed: the byte budget until the answer is made, the deadline for the
        # whole body, and a place under the cap on calls waiting on V3 (max_upstream_calls). The
        # cap applies too because these calls wait on the same upstream connection pool, and the
        # cap is what keeps part of that pool free for polls (V2's and the pass-through's own).
        # Calls without a body (polls, downloads) are never refused, as V2 polls are not.
        try:
            body = app[LIMITS].stream(request)
        except (Overloaded, web.HTTPRequestEntityTooLarge) as e:
            return _counted(request, _refusal(e))
    try:
        return _counted(request, await _forward(request, body))
    finally:
        if body is not None:
            body.let_go()


def _counted(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """A call answered: in the metrics, and in the usage store under its caller's fingerprint, so that
    a client moving to V3 is told from one that went quiet."""
    app = request.app
    app[METRICS].v3_passthrough.labels(request.method, response.status).inc()
    key = _caller_key(request)
    app[USAGE].tallies.v3_call(app[FINGERPRINT](key) if key else None, request.method, response.status)
    return response


async def _forward(request: web.Request, body: BodyStream | None) -> web.StreamResponse:
    app = request.app
    metrics = app[METRICS]
    url = URL(app[UPSTREAM_URL] + request.rel_url.raw_path_qs, encoded=True)  # bytes as the client sent them
    started = time.perf_counter()
    key = _caller_key(request)
    response: web.StreamResponse | None = None
    metrics.calls_in_flight += 1
    try:
        async with app[SESSION].request(
            request.method, url, headers=_request_headers(request), data=body.chunks() if body else None,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            auto_decompress=False, allow_redirects=False,
        ) as upstream:
            if upstream.status >= 400:
                response = await _scrubbed_error(upstream, key)
            else:
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                              headers=end_to_end(upstream.headers))
                if upstream.content_length is not None:
                    response.content_length = upstream.content_length
                await response.prepare(request)
                async for chunk in upstream.content.iter_chunked(CHUNK):
                    await response.write(chunk)
                await response.write_eof()
    except (TimeoutError, aiohttp.ClientError, Overloaded, BodyTimeout) as e:
        if response is not None and response.prepared:
            raise  # mid-stream: nothing sane left to send; the connection is closed
        if body is not None and body.cut is not None:  # a limit stopped the body (aiohttp wraps it)
            response = _refusal(body.cut)
        else:
            # aiohttp's words name the upstream's address: for the log, not for the client
            log.warning("v3 pass-through failed", method=request.method, path=request.path,
                        detail=redact(repr(e), key))
            if isinstance(e, TimeoutError):
                response = _error(504, "GATEWAY_TIMEOUT", "the upstream did not answer in time")
            else:
                response = _error(502, "UPSTREAM_UNAVAILABLE", "the upstream could not be reached")
    finally:
        metrics.calls_in_flight -= 1
        metrics.observe_upstream("passthrough", time.perf_counter() - started)
    return response
