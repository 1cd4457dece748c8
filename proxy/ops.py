"""Operations and migration endpoints: /healthz, /readyz, /metrics, /_proxy/guide, /_proxy/translate,
/_proxy/openapi.json."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.errors import V2Error
from proxy.guide import guide as make_guide
from proxy.keys import MAPPINGS, METRICS, READINESS, TASK_STORE, TRANSLATOR, WEBHOOKS
from proxy.limits import LIMITS
from proxy.v2.reply import v2_reply

# the proxy's own HTTP surface, kept by hand beside the code (tests/test_openapi.py holds them together)
OPENAPI = Path(__file__).with_name("openapi.json")


def _json(doc: dict, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    """Alive: the process answers."""
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready for traffic: 503 while starting or draining, so a load balancer moves on.

    It also says whether the task store (Redis, for replicas) answers, but stays 200 when it does
    not: every replica shares that Redis, so it would take them all out of the Service at once,
    and the direct path, most of the traffic, needs no store. Composed calls get code 5 meanwhile,
    and the store recovers by itself."""
    state = request.app[READINESS].state
    body = {"status": state}
    if state == "ready":
        body["task_store"] = "ok" if await request.app[TASK_STORE].reachable() else "unreachable"
    return _json(body, 200 if state == "ready" else 503)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def guide(request: web.Request) -> web.Response:
    return web.Response(text=make_guide(request.app[MAPPINGS]), content_type="text/markdown")


async def translate(request: web.Request) -> web.Response:
    """POST a V2 upscale body: the V3 request(s) it becomes, with no upstream call. The body is read
    under the body deadline and the byte budget (proxy/limits.py): code 9 or 5 as a submission."""
    try:
        let_go = await request.app[LIMITS].read_body(request)
        try:
            return v2_reply(data=request.app[TRANSLATOR].preview(await request.read()))
        finally:
            let_go()
    except V2Error as e:
        return v2_reply(e.code, e.msg)


async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of this proxy, without the paths a setting turned off."""
    return web.Response(body=openapi_document(WEBHOOKS in request.app), content_type="application/json")


@cache
def openapi_document(webhooks: bool) -> bytes:
    doc = orjson.loads(OPENAPI.read_bytes())
    enabled = {"UPSCALE_PROXY_WEBHOOKS": webhooks}
    doc["paths"] = {path: item for path, item in doc["paths"].items()
                    if enabled.get(item.get("x-enabled-by"), True)}
    return orjson.dumps(doc)
