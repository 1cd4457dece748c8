"""Operations and migration endpoints: /healthz, /readyz, /metrics, /_proxy/guide, /_proxy/translate."""

from __future__ import annotations

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.errors import V2Error
from proxy.guide import guide as make_guide
from proxy.keys import MAPPINGS, METRICS, READINESS, TRANSLATOR
from proxy.v2.reply import v2_reply


def _json(doc: dict, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    """Alive: the process answers."""
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready for traffic: 503 while starting or draining, so a load balancer moves on."""
    state = request.app[READINESS].state
    return _json({"status": state}, 200 if state == "ready" else 503)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def guide(request: web.Request) -> web.Response:
    return web.Response(text=make_guide(request.app[MAPPINGS]), content_type="text/markdown")


async def translate(request: web.Request) -> web.Response:
    """POST a V2 upscale body: the V3 request(s) it becomes, with no upstream call."""
    try:
        return v2_reply(data=request.app[TRANSLATOR].preview(await request.read()))
    except V2Error as e:
        return v2_reply(e.code, e.msg)
