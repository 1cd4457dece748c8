"""Helpers for tests that talk to the proxy like a V2 client."""

from __future__ import annotations

import asyncio
import base64
import socket
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from novita_client.proto import ProgressResponse
from PIL import Image

from tests.images import decode

# a copy of ../shared/contracts, so that the suite runs from this repository alone
CONTRACTS = Path(__file__).parent / "contracts"
KEY = "sk-test-0123456789abcdef"
PROGRESS_FIELDS = {"status", "progress", "eta_relative", "imgs", "failed_reason", "current_images", "submit_time",
                   "execution_time", "txt2img_time", "finish_time", "info", "enable_nsfw_detection",
                   "nsfw_detection_result", "debug_info"}
AUTH = {"Authorization": f"Bearer {KEY}"}


async def v2_call(client: TestClient, method: str, path: str, **kw) -> dict:
    """One V2 call; asserts what every V2 reply must be: HTTP 200, JSON, the V2 envelope."""
    kw.setdefault("headers", AUTH)
    async with client.request(method, path, **kw) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "application/json"
        doc = await resp.json()
    assert set(doc) == {"code", "msg", "data"}
    if path.startswith("/v2/progress"):
        check_progress_reply(doc)
    return doc


def check_progress_reply(doc: dict) -> None:
    """What every /v2/progress reply must be, whatever its code: `data` with every V2 field, which the
    legacy SDK's own parser reads; a reply with an error code is a final failure, with the message."""
    assert isinstance(doc["data"], dict) and set(doc["data"]) >= PROGRESS_FIELDS, doc
    parsed = ProgressResponse.from_dict(doc)  # novita-client 0.4.12's
    assert parsed.data.status.value == doc["data"]["status"], doc
    if doc["code"]:
        assert parsed.data.status.finished() and doc["data"]["failed_reason"] == doc["msg"], doc


async def upscale(client: TestClient, body: dict, **kw) -> dict:
    return await v2_call(client, "POST", "/v2/upscale", json=body, **kw)


async def poll_until_done(client: TestClient, task_id: str, **kw) -> dict:
    for _ in range(500):
        doc = await v2_call(client, "GET", f"/v2/progress?task_id={task_id}", **kw)
        assert doc["code"] == 0, doc
        if doc["data"]["status"] in (2, 3, 4):
            return doc["data"]
        await asyncio.sleep(0.02)
    raise AssertionError("task never finished")


async def run_v2(client: TestClient, data: bytes, body: dict) -> tuple[dict, Image.Image]:
    """Upscale `data` with the V2 fields of `body`, poll until done, download: (the reply, the image)."""
    reply = await upscale(client, {**body, "image": base64.b64encode(data).decode()})
    assert reply["code"] == 0, reply
    result = await poll_until_done(client, reply["data"]["task_id"])
    assert result["status"] == 2, result
    async with client.session.get(result["imgs"][0]) as resp:
        assert resp.status == 200 and resp.content_type == "image/png"
        return reply, decode(await resp.read())


def free_port() -> int:
    """A loopback port nobody listens on (yet)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port_url() -> str:
    """A loopback URL nobody listens on."""
    return f"http://127.0.0.1:{free_port()}"


async def wait_for_port(port: int, tries: int = 200) -> None:
    """Until something listens on the loopback port (a server process starting)."""
    for _ in range(tries):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port}")


async def recording_host(aiohttp_server, answer: Callable[[web.Request], web.StreamResponse]
                         ) -> tuple[TestServer, list[str]]:
    """A server on loopback answering every path and method with `answer` (which may raise, a
    redirect say), and the list of what was asked of it (path and query), to assert on."""
    seen: list[str] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append(request.path_qs)
        return answer(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return await aiohttp_server(app), seen
