"""Hostile input, upstream faults and a known key: the key never shows in a log line or a reply; a
task is its key's alone; image paths stay in the results folder; image fetches stay at the allowed
origins; aiohttp's own error logging neither quotes a request nor floods."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy import logs
from proxy.app import create_app
from proxy.audit import EVENT
from proxy.compose.task import new_task_id
from proxy.emulator import EMULATOR
from proxy.keys import RESULTS
from proxy.settings import Settings
from tests.helpers import closed_port_url, free_port, poll_until_done, recording_host
from tests.images import encode, pattern

KEY = "sk-sec-4f1c9e2a7b3d8e6f0a5c"  # the key every call below is made with
OTHER = "sk-sec-other-77d2c1"
DIRECT = {"upscaler_1": "4x-UltraSharp", "upscaling_resize": 2}
COMPOSED = {"upscaling_resize": 6}  # a factor past V3's 4: a native pass, then Lanczos
ALWAYS_ON = [{"start": "2020-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"}]


def image(w: int = 9, h: int = 9) -> str:
    return base64.b64encode(encode(pattern(w, h))).decode()


class Replies:
    """Every reply body the tests saw, to scan."""

    def __init__(self) -> None:
        self.bodies: list[str] = []

    async def call(self, client: TestClient, method: str, path: str, key: str | None = KEY,
                   header: str = "Authorization", **kw) -> tuple[int, bytes]:
        headers = {header: f"Bearer {key}" if header == "Authorization" else key} if key else {}
        async with client.request(method, path, headers=kw.pop("headers", headers), **kw) as resp:
            body = await resp.read()
        self.bodies.append(f"{resp.status} {resp.reason} {dict(resp.headers)} ".replace("'", '"')
                           + body.decode("latin-1"))
        return resp.status, body

    async def v2(self, client: TestClient, method: str, path: str, **kw) -> dict:
        status, body = await self.call(client, method, path, **kw)
        doc = json.loads(body)
        assert status in (200, 404) and set(doc) == {"code", "msg", "data"}, body
        return doc

    async def upscale(self, client: TestClient, fields: dict, **kw) -> dict:
        return await self.v2(client, "POST", "/v2/upscale", json={"image": image(), **fields}, **kw)

    async def until_done(self, client: TestClient, task_id: str, **kw) -> dict:
        for _ in range(400):
            doc = await self.v2(client, "GET", f"/v2/progress?task_id={task_id}", **kw)
            if doc["code"] or doc["data"]["status"] in (2, 3, 4):
                return doc
            await asyncio.sleep(0.02)
        raise AssertionError("task never finished")


def key_hits(text: str, key: str = KEY) -> list[str]:
    """The forms of `key` found in `text` (any case): as sent, Bearer, URL- and JSON-escaped."""
    low = text.lower()
    forms = {key, f"Bearer {key}", quote(key, safe=""), json.dumps(key)[1:-1]}
    return [form for form in forms if form.lower() in low]


def echoing_upstream() -> web.Application:
    """A V3 that quotes the caller's Authorization back in every error, in its reason and message."""

    async def refuse(request: web.Request) -> web.Response:
        said = request.headers.get("Authorization", "") or request.headers.get("X-Omni-Key", "")
        status = 404 if "task-result" in request.path else 403
        resp = web.json_response({"code": status, "reason": f"INVALID_API_KEY {said}",
                                  "message": f"key {said.removeprefix('Bearer ')} is not valid ({said})",
                                  "metadata": {"authorization": said}}, status=status, reason=f"Refused {said}")
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            resp.enable_compression()
        return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    return app


@pytest.fixture
def start_reachable_proxy(aiohttp_client, tmp_path):
    """A proxy on a known loopback port, so that it can tell V3 where to call it back."""

    async def start(upstream: str, **overrides) -> TestClient:
        port = free_port()
        settings = Settings(upstream=upstream, data_dir=tmp_path / f"data-{port}", webhooks=True,
                            public_url=f"http://127.0.0.1:{port}", poll_cache_seconds=0, **overrides)
        return await aiohttp_client(create_app(settings), server_kwargs={"port": port})

    return start


# --- (a) the key, through every path -----------------------------------------------------------

async def test__known_key__is_in_no_log_line_and_no_reply_on_any_path(start_emulator, start_proxy, aiohttp_server,
                                                                      start_reachable_proxy, log_lines, capfd):
    seen = Replies()

    # healthy: direct, composed (and its image), each header form, pass-through, an unknown task
    server, _ = await start_emulator(api_keys=[KEY, OTHER])
    healthy = await start_proxy(str(server.make_url("")))
    for header in ("Authorization", "X-Omni-Key"):
        for fields in (DIRECT, COMPOSED):
            reply = await seen.upscale(healthy, fields, header=header)
            assert reply["code"] == 0, reply
            done = await seen.until_done(healthy, reply["data"]["task_id"], header=header)
            assert done["data"]["status"] == 2, done
        status, _ = await seen.call(healthy, "GET", done["data"]["imgs"][0].removeprefix(str(healthy.make_url(""))))
        assert status == 200
    assert (await seen.v2(healthy, "GET", "/v2/progress?task_id=not-a-task"))["code"] == 3
    assert (await seen.call(healthy, "POST", "/v3/async/upscale", json={"request": {
        "model_name": "4x-UltraSharp", "scale_factor": 2, "image_base64": image()}}))[0] == 200
    assert (await seen.call(healthy, "GET", "/v3/async/task-result?task_id=nope"))[0] == 404
    assert (await seen.call(healthy, "GET", "/v3/async/task-result?task_id=nope", key="sk-unknown"))[0] == 403

    # an upstream that quotes the key back in every error: V2 calls and the pass-through
    echo = await start_proxy(str((await aiohttp_server(echoing_upstream())).make_url("")))
    for fields in (DIRECT, COMPOSED):
        assert (await seen.upscale(echo, fields))["code"] == 4
    failed = await seen.v2(echo, "GET", "/v2/progress?task_id=abc")
    assert failed["code"] == 3 and "[redacted]" in failed["data"]["failed_reason"], failed
    status, body = await seen.call(echo, "GET", "/v3/async/task-result?task_id=abc")
    assert status == 404 and b"[redacted]" in body and json.loads(body)["metadata"]["authorization"]
    status, body = await seen.call(echo, "POST", "/v3/async/upscale", json={}, header="X-Omni-Key")
    assert status == 403 and b"[redacted]" in body
    status, body = await seen.call(echo, "GET", "/v3/async/task-result?task_id=abc",
                                   headers={"Authorization": f"Bearer {KEY}", "Accept-Encoding": "gzip"})
    assert status == 404 and json.loads(body)["message"] == "key [redacted] is not valid (Bearer [redacted])"

    # errors injected by the emulator, with the key in V3's reason, at submission and at polls
    server, emu = await start_emulator(error_reason=f"INVALID_API_KEY Bearer {KEY}", error_endpoints=["submit"])
    faulty = await start_proxy(str(server.make_url("")), upstream_retries=0)
    for fields in (DIRECT, COMPOSED):
        reply = await seen.upscale(faulty, fields)
        assert reply["code"] != 0 and "[redacted]" in reply["msg"], reply
    assert (await seen.call(faulty, "POST", "/v3/async/upscale", json={"request": {
        "model_name": "4x-UltraSharp", "scale_factor": 2, "image_base64": image()}}))[0] == 500
    emu.settings.error_endpoints = []
    reply = await seen.upscale(faulty, DIRECT)
    emu.settings.error_reason, emu.settings.error_endpoints = f"GET_RESULT_FAILED for {KEY}", ["result"]
    ridden = await seen.v2(faulty, "GET", f"/v2/progress?task_id={reply['data']['task_id']}")
    assert ridden["code"] == 0, ridden  # a 500: the poll rides through it (V3's words go to the log, redacted)

    # V3 down: V2 calls, the pass-through
    down = await start_proxy(closed_port_url(), upstream_retries=0)
    assert (await seen.upscale(down, DIRECT))["code"] == 5
    assert (await seen.call(down, "GET", "/v3/async/task-result?task_id=abc"))[0] == 502

    # a brownout
    brownout = await start_proxy(str(server.make_url("")), brownouts=ALWAYS_ON)
    assert (await seen.upscale(brownout, DIRECT))["code"] == 10

    # webhooks: V3 posts the results; polls answer from them
    server, _ = await start_emulator()
    hooked = await start_reachable_proxy(str(server.make_url("")))
    for fields in (DIRECT, COMPOSED):
        reply = await seen.upscale(hooked, fields)
        assert (await seen.until_done(hooked, reply["data"]["task_id"]))["data"]["status"] == 2

    logs.flush()
    out, err = capfd.readouterr()
    assert len(log_lines.requests()) >= 20 and len(seen.bodies) >= 30
    assert "[redacted]" in log_lines.text  # the scrubbed detail reached the log
    for where, text in [("log", log_lines.text), ("stdout", out), ("stderr", err), *(("reply", b) for b in seen.bodies)]:
        assert not key_hits(text), (where, text[:2000])


async def test__malformed_header_quoting_the_key__is_logged_short_and_bounded(proxy, log_lines, capfd):
    """aiohttp logs a traceback quoting the bad header bytes for each such request; through the
    proxy's logging, each is one short line without them, and 200 of them make at most a window's
    worth of lines."""
    port = proxy.server.port
    bad = [
        f"GET /v2/progress?task_id=x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {KEY}\x01\r\n\r\n",
        f"POST /v2/upscale HTTP/1.1\r\nHost: a\r\nX-Omni-Key: {KEY}\r\nBad Header: {KEY}\r\n\r\n",
        f"GET /v3/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    ]
    for i in range(200):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(bad[i % len(bad)].encode("latin-1"))
        await writer.drain()
        assert b" 400 Bad Request" in await reader.read(100)
        writer.close()
        await writer.wait_closed()
    logs.flush()
    out, err = capfd.readouterr()
    library = [line for line in log_lines if str(line.get("logger", "")).startswith("aiohttp")]
    assert 1 <= len(library) <= logs.LIBRARY_LINES
    assert all(line["error"] == "BadHttpMessage" and line["status"] == 400 for line in library)
    assert {line["reason"] for line in library} >= {"Invalid header value char", "Invalid header token"}
    assert all(len(json.dumps(line)) < 400 for line in library)
    assert not key_hits(log_lines.text) and not key_hits(out) and not key_hits(err)
    assert "Traceback" not in err and len(err) < 2000


def test__library_log_flood__is_cut_to_a_window_then_counted():
    now = [0.0]
    lines = _capture()
    handler = logs.LibraryLogs(max_lines=3, window=10, clock=lambda: now[0])
    record = _record("Error handling request from %s", ("127.0.0.1",))
    for _ in range(50):
        handler.emit(record)
    handler.flush()  # the window is not over: nothing more yet
    assert [line["event"] for line in lines()] == ["Error handling request from 127.0.0.1"] * 3
    now[0] = 10.5
    handler.flush()
    suppressed = lines()[-1]
    assert suppressed["event"] == "library log lines suppressed" and suppressed["suppressed"] == 47
    handler.emit(record)
    assert len(lines()) == 5


def test__library_line__keeps_numbers_and_addresses_never_the_arguments_or_exception_text():
    lines = _capture()
    handler = logs.LibraryLogs(max_lines=10)
    try:
        raise ValueError(f"header was Authorization: Bearer {KEY}")
    except ValueError:
        handler.emit(_record("bad %s from %s on %d\nfuture: <Task exception=%r>", (KEY, "10.1.2.3", 8080, KEY),
                             exc_info=sys.exc_info()))
    [line] = lines()
    assert line["event"] == "bad ... from 10.1.2.3 on 8080" and line["error"] == "ValueError"
    assert "test_security.py" in line["where"] and not key_hits(json.dumps(line))


def _capture():
    stream = __import__("io").BytesIO()
    logs.configure("json", "debug", stream=stream, cache=False)
    return lambda: [json.loads(x) for x in stream.getvalue().splitlines()]


def _record(msg: str, args: tuple, exc_info=None):
    import logging

    return logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, msg, args, exc_info)


# --- audit events whatever the level -----------------------------------------------------------

@pytest.mark.parametrize("level", ["warning", "error"])
async def test__audit_event__is_written_whatever_the_log_level(emulator, start_proxy, log_lines, level):
    logs.configure("json", level, stream=log_lines.stream, cache=False)
    client = await start_proxy(str(emulator[0].make_url("")))
    seen = Replies()
    reply = await seen.upscale(client, COMPOSED)
    await seen.until_done(client, reply["data"]["task_id"])
    logs.flush()
    events = [line["event"] for line in log_lines]
    assert events.count(EVENT) >= 2 and all(line["level"] == "info" for line in log_lines.requests())
    assert "composed" not in events  # other info lines are quiet at this level


# --- (b) a task is its key's alone --------------------------------------------------------------

async def test__another_key__cannot_read_a_composed_or_direct_task(start_emulator, start_proxy):
    server, _ = await start_emulator(api_keys=[KEY, OTHER])
    client = await start_proxy(str(server.make_url("")))
    seen = Replies()
    for fields in (COMPOSED, DIRECT):
        task_id = (await seen.upscale(client, fields))["data"]["task_id"]
        assert (await seen.until_done(client, task_id))["data"]["status"] == 2
        other = await seen.v2(client, "GET", f"/v2/progress?task_id={task_id}", key=OTHER)
        assert other["code"] == 3 and other["data"]["status"] == 3 and other["data"]["imgs"] is None
    guessed = await seen.v2(client, "GET", f"/v2/images/{new_task_id()}.png", key=OTHER)
    assert guessed["code"] == 3
    assert not any(task_id in body for body in seen.bodies[-2:])


async def test__another_key__cannot_download_a_composed_image(start_emulator, start_proxy):
    server, _ = await start_emulator(api_keys=[KEY, OTHER])
    client = await start_proxy(str(server.make_url("")))
    seen = Replies()
    task_id = (await seen.upscale(client, COMPOSED))["data"]["task_id"]
    assert (await seen.until_done(client, task_id))["data"]["status"] == 2
    assert (await seen.call(client, "GET", f"/v2/images/{task_id}.png"))[0] == 200
    status, body = await seen.call(client, "GET", f"/v2/images/{task_id}.png", key=OTHER)
    assert status == 404 and json.loads(body)["code"] == 3


# --- (c) image paths stay in the results folder -------------------------------------------------

_opened: list[str] | None = None


def _watch_opens(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], (str, bytes, Path)):
        _opened.append(str(args[0]))


sys.addaudithook(_watch_opens)  # process-wide and permanent: it records only while a test sets _opened

def _like_a_composed_id(path: str) -> str:
    """`path` shaped as a composed task id (36 characters, the version "8" at 14), so that it gets
    past the id check to the task store."""
    tid = (path[:14].ljust(14, "x") + "8" + path[14:]).ljust(36, "x")[:36]
    assert len(tid) == 36 and tid[14] == "8"
    return quote(tid, safe="")


TRAVERSALS = [  # {task_id} of /v2/images/{task_id}.png
    "..%2f..%2fsecret", "..%2F..%2Fdata%2Fsecret", "%2e%2e%2f%2e%2e%2fsecret", "%2Fetc%2Fpasswd", "%2fetc%2fpasswd%00",
    "..%5c..%5csecret", "%252e%252e%252fsecret", "..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
    _like_a_composed_id("../../../../../secret"), _like_a_composed_id("/etc/passwd/../x"),
    _like_a_composed_id("../tasks.sqlite3%00"), _like_a_composed_id("..\\..\\secret"),
]
ROUTED_ELSEWHERE = [  # not the images route at all
    "/v2/images//etc/passwd.png", "/v2/images/../../secret.png", "/v2/images/....//....//secret.png",
    "/v2/images/..%2F..%2Ftasks.sqlite3", "/v2/images/%2Fetc%2Fpasswd",
]


async def test__path_traversal_on_images__is_404_with_a_v2_body_and_reads_nothing_outside(emulator, start_proxy,
                                                                                           tmp_path):
    global _opened
    client = await start_proxy(str(emulator[0].make_url("")))
    (tmp_path / "secret.png").write_bytes(b"CANARY-OUTSIDE")
    (tmp_path / "data" / "secret.png").write_bytes(b"CANARY-DATA")
    results = client.server.app[RESULTS]
    seen = Replies()
    real = (await seen.upscale(client, COMPOSED))["data"]["task_id"]
    assert (await seen.until_done(client, real))["data"]["status"] == 2
    _opened = []
    try:
        for raw in TRAVERSALS:
            reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
            writer.write(f"GET /v2/images/{raw}.png HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
            head, _, body = (await reader.read()).partition(b"\r\n\r\n")
            writer.close()
            assert head.startswith(b"HTTP/1.1 404"), (raw, head)
            assert json.loads(body) == {"code": 3, "msg": "no such image, or it has expired", "data": None}, raw
        for path in ROUTED_ELSEWHERE:  # not the images route at all: V2's "no such endpoint"
            reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
            _, _, body = (await reader.read()).partition(b"\r\n\r\n")
            writer.close()
            assert json.loads(body)["code"] == 10 and b"CANARY" not in body, path
        opened = list(_opened)
    finally:
        _opened = None
    folder = str(results._folder.resolve())
    outside = [p for p in opened if not p.endswith((".py", ".pyc")) and not str(Path(p).resolve()).startswith(folder)]
    assert outside == []
    assert (await seen.call(client, "GET", f"/v2/images/{real}.png"))[0] == 200  # the real one still is


# --- (d) image URLs pointing elsewhere are never fetched ----------------------------------------

@pytest.fixture
async def canary(aiohttp_server):
    """A server on another loopback port, not allowed: it counts what reaches it."""
    def nowhere(_: web.Request) -> web.Response:
        raise web.HTTPFound("/")  # were it fetched, it would not lead anywhere either

    server, server.hits = await recording_host(aiohttp_server, nowhere)
    return server


async def test__v3_image_urls_at_another_loopback_port__are_never_fetched(start_emulator, start_proxy, canary,
                                                                          log_lines):
    server, _ = await start_emulator()
    server.app[EMULATOR].settings.public_url = str(canary.make_url("")).rstrip("/")  # V3 now points there
    client = await start_proxy(str(server.make_url("")))
    seen = Replies()
    for fields in (COMPOSED, {**COMPOSED, "upscaler_2": "R-ESRGAN 4x+ Anime6B", "extras_upscaler_2_visibility": 0.5}):
        task_id = (await seen.upscale(client, fields))["data"]["task_id"]
        data = (await seen.until_done(client, task_id))["data"]
        assert data["status"] == 3 and "not an allowed origin" in data["failed_reason"], data
        assert "127.0.0.1" not in data["failed_reason"] and str(canary.port) not in data["failed_reason"]
    assert canary.hits == []
    refused = [line for line in log_lines if line["event"] == "image fetch refused"]
    assert refused and str(canary.port) in refused[0]["url"]  # operators see where


async def test__v3_image_url_redirecting_to_the_canary__is_not_followed(start_emulator, start_proxy, canary,
                                                                        aiohttp_server):
    def moved(_: web.Request) -> web.Response:
        raise web.HTTPFound(str(canary.make_url("/stolen.png")))

    redirecting, _ = await recording_host(aiohttp_server, moved)
    redirector = str(redirecting.make_url("")).rstrip("/")
    server, _ = await start_emulator()
    server.app[EMULATOR].settings.public_url = redirector
    client = await start_proxy(str(server.make_url("")), image_origins=redirector)  # allowed, yet
    seen = Replies()
    task_id = (await seen.upscale(client, COMPOSED))["data"]["task_id"]
    data = (await seen.until_done(client, task_id))["data"]
    assert data["status"] == 3 and "HTTP 302" in data["failed_reason"]
    assert canary.hits == []


# --- what still leaks, outside these files ------------------------------------------------------

async def test__v3_failure_reason_echoing_the_key__is_scrubbed_on_every_path(start_emulator, start_proxy,
                                                                             start_reachable_proxy, log_lines):
    seen = Replies()
    server, emu = await start_emulator(fail_rate=1, fail_reason=f"model refused key {KEY}")
    for client in (await start_proxy(str(server.make_url(""))), await start_reachable_proxy(str(server.make_url("")))):
        for fields in (DIRECT, COMPOSED):
            reply = await seen.upscale(client, fields)
            data = (await seen.until_done(client, reply["data"]["task_id"]))["data"]
            assert data["status"] == 3 and "[redacted]" in data["failed_reason"], data
    emu.settings.fail_rate, emu.settings.error_reason = 0, f"SERVICE_NOT_AVAILABLE {KEY}"
    emu.settings.error_endpoints = ["result"]
    client = await start_proxy(str(server.make_url("")), compose_deadline=0.5)
    reply = await seen.upscale(client, COMPOSED)
    assert (await poll_until_done(client, reply["data"]["task_id"], headers={"Authorization": f"Bearer {KEY}"}))[
        "status"] == 4
    logs.flush()
    for text in (log_lines.text, *seen.bodies):
        assert not key_hits(text), text[:2000]
