"""The V2 envelope: `{"code", "msg", "data"}`, always HTTP 200 (legacy SDKs raise on anything else)."""

from __future__ import annotations

import orjson
from aiohttp import web

from proxy.errors import V2Code


def v2_reply(code: V2Code = V2Code.NORMAL, msg: str = "", data: dict | None = None,
             status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps({"code": int(code), "msg": msg, "data": data}),
        status=status,
        content_type="application/json",
    )
