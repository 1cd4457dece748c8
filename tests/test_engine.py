"""The task engine: composed tasks move on in the background; polls answer at once from what is
stored, never wait for V3, a fetch or a composition; progress only moves forward; failures that
can't heal end the task at once; a rate limit is waited out; another process takes a task over.
The task store's own contract (leases, due tasks) is tests/test_stores.py, over both backends."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import struct
import subprocess
import sys
import threading
import zlib

import pytest
from aiohttp import web

from proxy.compose.task import is_composed_id
from proxy.keys import TASKS
from tests.helpers import (
    AUTH,
    free_port,
    poll_until_done,
    recording_host,
    upscale,
    v2_call,
    wait_for_port,
)
from tests.images import encode, pattern


def body(w: int = 9, h: int = 9, **fields) -> dict:
    return {"image": base64.b64encode(encode(pattern(w, h))).decode(), **fields}


async def poll(client, task_id: str, **kw) -> dict:
    doc = await v2_call(client, "GET", f"/v2/progress?task_id={task_id}", **kw)
    assert doc["code"] == 0, doc
    return doc["data"]


async def test__poll_during_a_composition__answers_at_once_with_status_1(proxy):
    engine = proxy.server.app[TASKS]
    entered, release = threading.Event(), threading.Event()
    compose = engine.compose

    def held(*args):  # the composition waits, in its thread, until the test lets it go
        entered.set()
        release.wait(30)
        return compose(*args)

    engine.compose = held
    reply = await upscale(proxy, body(upscaler_1="Lanczos", upscaling_resize=3))
    task_id = reply["data"]["task_id"]
    for _ in range(500):
        if entered.is_set():
            break
        await asyncio.sleep(0.01)
    assert entered.is_set()
    data = await poll(proxy, task_id)
    assert (data["status"], data["imgs"]) == (1, None) and data["progress"] < 1
    release.set()
    assert (await poll_until_done(proxy, task_id))["status"] == 2


async def test__progress__never_goes_back_over_three_passes_and_a_blend(start_emulator, start_proxy):
    server, _ = await start_emulator(queue_delay=0.03, process_delay=0.03)
    client = await start_proxy(str(server.make_url("")))
    reply = await upscale(client, body(5, 3, upscaler_1="4x-UltraSharp", upscaling_resize=20,
                                       upscaler_2="R-ESRGAN 4x+ Anime6B", extras_upscaler_2_visibility=0.5))
    task_id = reply["data"]["task_id"]
    seen = []
    for _ in range(1000):
        data = await poll(client, task_id)
        seen.append((data["status"], data["progress"], data["eta_relative"]))
        if data["status"] in (2, 3, 4):
            break
        await asyncio.sleep(0.005)
    statuses, progress = [s for s, _, _ in seen], [p for _, p, _ in seen]
    assert statuses[-1] == 2 and statuses == sorted(statuses)
    assert progress == sorted(progress) and progress[-1] == 1
    assert len(set(progress)) >= 4  # it moved through the passes, not straight from 0 to 1
    running_etas = [e for s, _, e in seen if s < 2]
    assert running_etas == sorted(running_etas, reverse=True)


@pytest.fixture
async def bomb_host(aiohttp_server):
    """An image host whose every image claims 30000 x 30000 pixels; it counts its requests."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # a PNG header, no more: decoders refuse it from its size before reading any pixel
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 1, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    return await recording_host(aiohttp_server, lambda _: web.Response(body=bomb, content_type="image/png"))


async def test__an_image_too_large__ends_the_task_once_with_one_fetch(emulator, start_proxy, bomb_host):
    server, emu = emulator
    host, served = bomb_host
    emu.settings.public_url = str(host.make_url("")).rstrip("/")  # V3's image URLs now point at it
    client = await start_proxy(str(server.make_url("")), image_hosts=f"127.0.0.1:{host.port}")
    reply = await upscale(client, body(upscaler_1="4x-UltraSharp", resize_mode=1, upscaling_resize_w=30,
                                       upscaling_resize_h=20, upscaling_crop=True))
    data = await poll_until_done(client, reply["data"]["task_id"])
    assert data["status"] == 3 and "pixels" in data["failed_reason"]
    for _ in range(5):
        again = await poll(client, reply["data"]["task_id"])
        assert (again["status"], again["failed_reason"]) == (3, data["failed_reason"])
        await asyncio.sleep(0.05)
    assert len(served) == 1


async def test__rate_limit_on_a_later_pass__is_waited_out(emulator, start_proxy):
    server, emu = emulator
    client = await start_proxy(str(server.make_url("")))
    reply = await upscale(client, body(5, 3, upscaler_1="4x-UltraSharp", upscaling_resize=20))
    # the first job went through; the next two submissions are refused with 429
    emu.settings.error_reason, emu.settings.error_endpoints, emu.settings.error_limit = (
        "RATE_LIMIT_EXCEEDED", ["submit"], 2)
    data = await poll_until_done(client, reply["data"]["task_id"])
    assert data["status"] == 2 and emu.injected == 2
    assert emu.requests["submit"] == 3 + 2  # three passes, two of them refused once


async def test__polls__make_no_v3_calls(start_emulator, start_proxy):
    server, emu = await start_emulator(queue_delay=0, process_delay=1.5)
    client = await start_proxy(str(server.make_url("")))
    reply = await upscale(client, body(upscaler_1="4x-UltraSharp", upscaling_resize=6))
    task_id = reply["data"]["task_id"]
    await asyncio.sleep(0.3)
    before = emu.requests["result"]
    for _ in range(10):
        await asyncio.gather(*(poll(client, task_id) for _ in range(10)))
    # 100 polls; the engine looks at V3's job on its own cadence (V3's eta, about 1 s)
    assert emu.requests["result"] - before <= 2
    assert (await poll_until_done(client, task_id))["status"] == 2


async def test__a_killed_process__its_task_is_finished_by_another(emulator, start_proxy, tmp_path):
    """SIGKILL a real `serve` process with a task in flight; a poll to another process on the same
    data directory brings the key there, and that process finishes the task."""
    server, emu = emulator
    emu.settings.process_delay = 0.5
    port = free_port()
    env = {**os.environ, "UPSCALE_PROXY_DATA_DIR": str(tmp_path / "data"), "UPSCALE_PROXY_TASK_LEASE": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--port", str(port), "--upstream", str(server.make_url("")),
         "--log-format", "json"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await wait_for_port(port)
        import aiohttp

        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{port}/v2/upscale", headers=AUTH,
                                 json=body(5, 3, upscaler_1="4x-UltraSharp", upscaling_resize=20)) as resp:
                task_id = (await resp.json())["data"]["task_id"]
        assert is_composed_id(task_id)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    second = await start_proxy(str(server.make_url("")), task_lease=1)
    data = await poll_until_done(second, task_id)
    assert data["status"] == 2
    assert emu.requests["submit"] == 3  # each pass submitted once, whichever process did it
