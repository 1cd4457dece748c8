"""A fake V3 on loopback, for the faults the emulator can't make. While healthy it relays every call
to a real upstream (the emulator); on demand it goes down (its port closed) and comes back on the
same port, resets each connection it accepts (counting them), breaks a reply half-way, answers a
200 that is not JSON, a gateway's bare 502 or V3's own 429, or points the image URLs of tasks
submitted from then on somewhere else."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections import Counter
from enum import Enum

import aiohttp
import orjson
from aiohttp import web
from yarl import URL

RELAYED = ("Authorization", "Content-Type")


class Fault(Enum):
    NONE = "none"  # relay to the real upstream
    RESET = "reset"  # accept the connection (counted), then reset it before reading anything
    RESET_MID_REPLY = "reset mid-reply"  # read the call, send half a 200, reset the connection
    MALFORMED_JSON = "malformed json"  # a 200, application/json, that does not parse
    BAD_GATEWAY = "bad gateway"  # a 502 with an HTML body, as a gateway in front of V3 sends it
    RATE_LIMITED = "rate limited"  # V3's 429 with its error body, RATE_LIMIT_EXCEEDED


# V3's error body for its rate limit (spec section 6)
RATE_LIMIT_BODY = {"code": 429, "reason": "RATE_LIMIT_EXCEEDED",
                   "message": "rate limit exceeded, please try again later", "metadata": {}}


class _Reset(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _reset(transport)


def _reset(transport: asyncio.BaseTransport) -> None:
    """Close with a TCP RST rather than a FIN, as a crashed server or a middlebox does."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class FakeUpstream:
    """`accepts` counts TCP connections accepted, `calls` the HTTP calls read and `faulted` those
    answered by a fault rather than relayed, by V3 endpoint."""

    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.fault = Fault.NONE
        self.fault_on: frozenset[str] | None = None  # the endpoints a fault hits (None: all)
        self.accepts = 0
        self.calls: Counter[str] = Counter()
        self.faulted: Counter[str] = Counter()
        self.port = 0
        self._images: tuple[str, frozenset[str]] | None = None  # (where to, task ids left alone)
        self._tasks: set[str] = set()  # V3 task ids of the submissions relayed
        self._listener: asyncio.Server | None = None
        self._server: web.Server | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeUpstream:
        self._session = aiohttp.ClientSession()
        self._server = web.Server(self._handle)
        await self.up()
        return self

    async def up(self) -> None:
        """Listen (again, on the same port once it has one)."""
        self._listener = await asyncio.get_running_loop().create_server(
            self._protocol, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._listener.sockets[0].getsockname()[1]

    async def down(self) -> None:
        """Close the port (connections are refused) and reset every open connection."""
        assert self._listener is not None
        self._listener.close()
        self.drop_connections()
        await self._listener.wait_closed()
        self._listener = None

    def drop_connections(self) -> None:
        """Reset every open connection (a client's keep-alive pool among them)."""
        assert self._server is not None
        for handler in self._server.connections:
            if handler.transport is not None:
                _reset(handler.transport)

    async def close(self) -> None:
        if self._listener is not None:
            await self.down()
        if self._server is not None:
            await self._server.shutdown(0)
        if self._session is not None:
            await self._session.close()

    def point_images_at(self, base: str | None) -> None:
        """From now on, the image URLs of tasks submitted after this call are `base` + their path
        (tasks submitted before keep theirs); None: every task keeps its own again."""
        self._images = (base.rstrip("/"), frozenset(self._tasks)) if base else None

    def _protocol(self) -> asyncio.Protocol:
        self.accepts += 1
        assert self._server is not None
        return _Reset() if self.fault is Fault.RESET else self._server()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        endpoint = {"/v3/async/upscale": "submit", "/v3/async/task-result": "result"}.get(request.path, "other")
        self.calls[endpoint] += 1
        body = await request.read()
        if self.fault_on is not None and endpoint not in self.fault_on:
            return await self._relay(request, endpoint, body)
        if self.fault is not Fault.NONE:
            self.faulted[endpoint] += 1
        if self.fault is Fault.RESET:  # a connection accepted before the fault: it goes too
            assert request.transport is not None
            _reset(request.transport)
            return web.Response()
        if self.fault is Fault.MALFORMED_JSON:
            return web.Response(body=b'{"task_id": "3f0c', content_type="application/json")
        if self.fault is Fault.BAD_GATEWAY:
            return web.Response(status=502, content_type="text/html",
                                text="<html><head><title>502 Bad Gateway</title></head></html>")
        if self.fault is Fault.RATE_LIMITED:
            return web.json_response(RATE_LIMIT_BODY, status=429)
        if self.fault is Fault.RESET_MID_REPLY:
            resp = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "400"})
            await resp.prepare(request)
            await resp.write(b'{"task_id": "')
            assert request.transport is not None
            _reset(request.transport)
            return resp
        return await self._relay(request, endpoint, body)

    async def _relay(self, request: web.BaseRequest, endpoint: str, body: bytes) -> web.Response:
        assert self._session is not None
        headers = {h: request.headers[h] for h in RELAYED if h in request.headers}
        async with self._session.request(request.method, URL(self.target + request.raw_path, encoded=True),
                                         headers=headers, data=body or None) as upstream:
            status, data, content_type = upstream.status, await upstream.read(), upstream.content_type
        if status == 200 and endpoint == "submit":
            self._tasks.add(orjson.loads(data)["task_id"])
        elif status == 200 and endpoint == "result" and self._images:
            data = self._rewrite_images(data, *self._images)
        return web.Response(body=data, status=status, content_type=content_type)

    @staticmethod
    def _rewrite_images(data: bytes, base: str, kept: frozenset[str]) -> bytes:
        doc = orjson.loads(data)
        if doc["task"]["task_id"] not in kept:
            for image in doc["images"]:
                image["image_url"] = base + URL(image["image_url"]).path
        return orjson.dumps(doc)
