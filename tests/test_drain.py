"""Stopping cleanly: on SIGTERM (or SIGINT) a real `serve` process answers /readyz 503 at once and
serves everything else for UPSCALE_PROXY_DRAIN_DELAY, then stops accepting, lets requests in flight
finish within UPSCALE_PROXY_SHUTDOWN_GRACE, lets go of its composed tasks (another process on the
same data directory completes them), flushes its log and exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.app import start_draining
from proxy.compose.task import is_composed_id
from tests.helpers import AUTH, free_port, poll_until_done, wait_for_port
from tests.images import b64

DRAIN_DELAY = 0.5


@dataclass
class Serve:
    """A `python -m proxy serve` process on a loopback port."""

    proc: subprocess.Popen
    port: int
    out: object = field(repr=False)
    err: object = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def exit_code(self, timeout: float = 15) -> int:
        """Waits for the process to end, without blocking the event loop (the emulator runs on it)."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, "the process did not stop"
            await asyncio.sleep(0.02)
        return self.proc.returncode

    def log(self) -> list[dict]:
        """Its stdout, one JSON object per line (every line must be one)."""
        self.out.seek(0)
        return [json.loads(line) for line in self.out.read().decode().splitlines()]

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read().decode()


@contextmanager
def serve(upstream: str, data_dir: Path, **env: str) -> Iterator[Serve]:
    port = free_port()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--port", str(port), "--upstream", upstream, "--log-format", "json"],
            stdout=out, stderr=err,
            env={**os.environ, "UPSCALE_PROXY_DATA_DIR": str(data_dir), "UPSCALE_PROXY_DRAIN_DELAY": str(DRAIN_DELAY),
                 **{f"UPSCALE_PROXY_{k.upper()}": v for k, v in env.items()}},
        )
        try:
            yield Serve(proc, port, out, err)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


async def started(server: Serve) -> None:
    try:
        await wait_for_port(server.port)
    except AssertionError:
        raise AssertionError(server.stderr()) from None


async def get(http: aiohttp.ClientSession, url: str, **kw) -> tuple[int, dict, dict]:
    async with http.get(url, **kw) as resp:
        return resp.status, dict(resp.headers), await resp.json()


async def draining(http: aiohttp.ClientSession, server: Serve) -> dict:
    """Right after the signal: /readyz says 503 (the signal may need a moment to be handled)."""
    for _ in range(20):
        status, headers, body = await get(http, f"{server.url}/readyz")
        if status == 503:
            assert body == {"status": "draining"}
            return headers
        await asyncio.sleep(0.01)
    raise AssertionError("/readyz did not turn 503 after the signal")


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def gated_a1111() -> tuple[web.Application, list[dict], asyncio.Event]:
    """An A1111 server whose face restoration answers (with the image it got) only once the gate opens,
    so that a composed task's step is certainly under way, holding its lease."""
    requests: list[dict] = []
    gate = asyncio.Event()

    async def restore(request: web.Request) -> web.Response:
        body = await request.json()
        requests.append(body)
        await gate.wait()
        return web.json_response({"image": body["image"], "html_info": ""})

    app = web.Application()
    app.router.add_post("/sdapi/v1/extra-single-image", restore)
    return app, requests, gate


async def test__sigterm__drains_serves_finishes_in_flight_then_another_process_completes_its_task(
        start_emulator, aiohttp_server, start_proxy, tmp_path):
    emulator, emu = await start_emulator(queue_delay=0.05, process_delay=0.05)
    a1111, restorations, gate = gated_a1111()
    restorer = str((await aiohttp_server(a1111)).make_url("")).rstrip("/")
    upstream, data = str(emulator.make_url("")), tmp_path / "data"
    with serve(upstream, data, face_restorer_url=restorer, poll_cache_seconds="0") as server:
        await started(server)
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{server.url}/v2/upscale", headers=AUTH, json={
                    "image": b64(24, 16), "upscaler_1": "4x-UltraSharp", "upscaling_resize": 2}) as resp:
                direct = (await resp.json())["data"]["task_id"]
            async with http.post(f"{server.url}/v2/upscale", headers=AUTH, json={
                    "image": b64(24, 16), "upscaler_1": "4x-UltraSharp", "upscaling_resize": 2,
                    "gfpgan_visibility": 0.5}) as resp:
                composed = (await resp.json())["data"]["task_id"]
            assert not is_composed_id(direct) and is_composed_id(composed)
            for _ in range(500):  # the composed task's step is at the face restorer, under its lease
                if restorations:
                    break
                await asyncio.sleep(0.02)
            assert restorations, "the composed task never reached the face restorer"
            emu.settings.latency = 1.5  # from now on V3 is slow: a direct poll takes 1.5 s

            server.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            headers = await draining(http, server)
            assert headers.get("Connection") == "close"  # keep-alive clients move on too
            slow = asyncio.create_task(get(http, f"{server.url}/v2/progress?task_id={direct}", headers=AUTH))
            status, _, body = await get(http, f"{server.url}/healthz")
            assert status == 200
            status, _, body = await get(http, f"{server.url}/v2/progress?task_id={composed}", headers=AUTH)
            assert status == 200 and body["code"] == 0 and body["data"]["status"] in (0, 1)
            assert time.monotonic() - signalled < DRAIN_DELAY  # all of that within the delay

            status, _, body = await slow  # in flight when the listener closed: it still completes
            assert time.monotonic() - signalled > DRAIN_DELAY
            assert status == 200 and body["code"] == 0 and body["data"]["status"] == 2
            assert not listening(server.port)
        assert await server.exit_code() == 0, server.stderr()
        lines = server.log()

    events = [line["event"] for line in lines]
    assert events[-1] == "stopped"  # flushed to the last line
    drain, close = events.index("draining"), events.index("closing the listener")
    slow_call = next(i for i, line in enumerate(lines)
                     if line["event"] == "v2.deprecated_call" and line.get("task_id") == direct
                     and line.get("upstream_status") == 200 and i > close)
    assert drain < close < slow_call < len(lines) - 1
    assert lines[drain]["signal"] == "SIGTERM" and lines[drain]["delay"] == DRAIN_DELAY

    # the task stayed in the store, its lease let go: a poll brings its key to another process at
    # once (not after UPSCALE_PROXY_TASK_LEASE, a minute), which completes it
    emu.settings.latency = 0
    gate.set()
    second = await start_proxy(upstream, data_dir=data, face_restorer_url=restorer)
    started_at = time.monotonic()
    result = await poll_until_done(second, composed)
    assert result["status"] == 2 and time.monotonic() - started_at < 10
    assert len(restorations) == 2  # the first process's restoration was cut short, and done again
    assert emu.requests["submit"] == 2  # each V3 job once: the direct one and the composed one's


async def test__second_sigint__ends_the_drain_delay_at_once(emulator, tmp_path):
    server_, _ = emulator
    with serve(str(server_.make_url("")), tmp_path / "data", drain_delay="60") as server:
        await started(server)
        async with aiohttp.ClientSession() as http:
            server.proc.send_signal(signal.SIGINT)
            await draining(http, server)
        server.proc.send_signal(signal.SIGINT)
        assert await server.exit_code(timeout=10) == 0, server.stderr()
        draining_line = next(line for line in server.log() if line["event"] == "draining")
    assert draining_line["signal"] == "SIGINT" and draining_line["delay"] == 60


async def test__request_past_the_shutdown_grace__is_cut_and_the_process_still_exits_0(aiohttp_server, tmp_path):
    submitted, gate = asyncio.Event(), asyncio.Event()

    async def v3_that_hangs(request: web.Request) -> web.Response:  # a V3 that takes its time
        submitted.set()
        await gate.wait()
        return web.json_response({"task_id": "never"})

    v3 = web.Application()
    v3.router.add_post("/v3/async/upscale", v3_that_hangs)
    upstream = str((await aiohttp_server(v3)).make_url(""))
    with serve(upstream, tmp_path / "data", shutdown_grace="0.5") as server:
        await started(server)
        async with aiohttp.ClientSession() as http:
            stuck = asyncio.create_task(http.post(f"{server.url}/v2/upscale", headers=AUTH,
                                                  json={"image": b64(24, 16), "upscaling_resize": 2}))
            await asyncio.wait_for(submitted.wait(), 10)
            server.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            assert await server.exit_code() == 0, server.stderr()
            assert time.monotonic() - signalled < DRAIN_DELAY + 2 * 0.5 + 3  # the grace, not V3's time
            with pytest.raises(aiohttp.ClientError):
                await stuck
        gate.set()
        assert server.log()[-1]["event"] == "stopped"


async def test__while_draining__readyz_is_503_and_every_response_closes_its_connection(proxy):
    async with proxy.get("/readyz") as resp:
        assert resp.status == 200 and resp.headers.get("Connection") != "close"
    start_draining(proxy.app)
    async with proxy.get("/readyz") as resp:
        assert resp.status == 503 and await resp.json() == {"status": "draining"}
        assert resp.headers["Connection"] == "close"
    async with proxy.get("/healthz") as resp:
        assert resp.status == 200 and resp.headers["Connection"] == "close"
