"""The process's limits (proxy/limits.py) with real servers on loopback: the byte budget, the body
deadline and the cap on calls waiting on V3 shed submissions with a V2 body while polls keep
answering; the /v3 pass-through (in V3's words) and /_proxy/translate go through the same limits;
the V3 emulator's own store stays bounded."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import time

import orjson
import pytest
from PIL import Image

from proxy.limits import LIMITS
from tests.helpers import AUTH, KEY, poll_until_done, upscale, v2_call
from tests.images import b64

BOUND = 10.0  # seconds: generous; "at once" and "after the deadline" mean well before it


def noise_b64(side: int, seed: int = 0) -> str:
    """A PNG of RGB noise (it doesn't compress: about 3 * side**2 bytes), base64."""
    image = Image.frombytes("RGB", (side, side), random.Random(seed).randbytes(side * side * 3))
    buf = io.BytesIO()
    image.save(buf, "PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode()


def body_of(size: int) -> bytes:
    """A valid V2 direct-path body of about `size` bytes (the image is noise)."""
    return orjson.dumps({"image": noise_b64(int((size * 0.75 / 3) ** 0.5)), "upscaling_resize": 2})


def head(length: int | None = None, chunked: bool = False, path: str = "/v2/upscale") -> bytes:
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}"
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\n{framing}\r\n\r\n").encode()


async def send_raw(client, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a connection to the proxy and send `data` (a request's head, perhaps part of its body)."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(data)
    await writer.drain()
    return reader, writer


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], dict]:
    """The HTTP response on `reader`, whose body must be JSON: (status, headers, body)."""
    async with asyncio.timeout(BOUND):
        status = await reader.readline()
        assert status.startswith(b"HTTP/1.1 "), status
        headers = {}
        while (line := await reader.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(status.split()[1]), headers, json.loads(await reader.readexactly(int(headers["content-length"])))


async def read_reply(reader: asyncio.StreamReader) -> dict:
    """The V2 body of the HTTP response on `reader`, which must be a 200 with JSON."""
    status, _, body = await read_response(reader)
    assert status == 200, (status, body)
    return body


async def post(client, data: bytes) -> dict:
    return await v2_call(client, "POST", "/v2/upscale", data=data,
                         headers={**AUTH, "Content-Type": "application/json"})


async def until(condition, what: str) -> None:
    async with asyncio.timeout(BOUND):
        while not condition():
            await asyncio.sleep(0.01)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    await writer.wait_closed()


# --- the byte budget -----------------------------------------------------------------------------

async def test__submission_past_byte_budget__gets_code_5_before_its_body_is_sent(emulator, start_proxy):
    server, _ = emulator
    proxy = await start_proxy(str(server.make_url("")), max_inflight_mb=1)
    limits = proxy.server.app[LIMITS]
    _, holder = await send_raw(proxy, head(700_000) + b'{"image": "')  # 700 KB of the budget, and stalls
    await until(lambda: limits.bytes_in_flight == 700_000, "the first submission to be counted")

    reader, writer = await send_raw(proxy, head(700_000))  # no body at all: the answer can't wait for it
    reply = await read_reply(reader)
    assert reply["code"] == 5 and reply["msg"].startswith("the proxy is overloaded"), reply
    assert "in flight" in reply["msg"]
    assert (await post(proxy, body_of(700_000)))["code"] == 5  # a whole body is refused the same
    await close(writer)

    await close(holder)
    await until(lambda: limits.bytes_in_flight == 0, "the stalled submission to let go of its bytes")
    assert (await post(proxy, body_of(700_000)))["code"] == 0
    async with proxy.get("/metrics") as resp:
        assert 'upscale_proxy_limits_refused_total{limit="bytes"} 2.0' in await resp.text()


async def test__byte_budget__is_released_when_each_request_ends(emulator, start_proxy):
    server, _ = emulator
    proxy = await start_proxy(str(server.make_url("")), max_inflight_mb=1)
    limits = proxy.server.app[LIMITS]
    body = body_of(700_000)
    for _ in range(3):  # each fits alone: it is only refused if an earlier one still counts
        assert (await post(proxy, body))["code"] == 0
    assert (await post(proxy, b'{"image": 1' + b" " * 600_000 + b"}"))["code"] == 1  # refused by the handler
    assert (await post(proxy, body))["code"] == 0
    assert (limits.bytes_in_flight, limits.upstream_calls) == (0, 0)


async def test__declared_body_larger_than_the_whole_budget__is_too_large(emulator, start_proxy):
    server, _ = emulator
    proxy = await start_proxy(str(server.make_url("")), max_inflight_mb=1)
    reader, writer = await send_raw(proxy, head(2 * 1024 * 1024))
    reply = await read_reply(reader)
    assert reply["code"] == 6, reply  # no retry would ever let it in: not a code 5
    await close(writer)


async def test__chunked_body__counts_as_it_arrives_and_is_refused_where_it_crosses(emulator, start_proxy):
    server, _ = emulator
    proxy = await start_proxy(str(server.make_url("")), max_inflight_mb=1)
    limits = proxy.server.app[LIMITS]

    async def chunks(data: bytes):
        for i in range(0, len(data), 64 * 1024):
            yield data[i:i + 64 * 1024]

    assert (await post(proxy, chunks(body_of(700_000))))["code"] == 0  # under the budget: read and served

    reader, writer = await send_raw(proxy, head(chunked=True))
    for _ in range(20):  # 20 chunks of 64 KiB: past 1 MiB at the 17th
        writer.write(b"10000\r\n" + b" " * 0x10000 + b"\r\n")
    await writer.drain()
    reply = await read_reply(reader)
    assert reply["code"] == 5 and "in flight" in reply["msg"], reply
    await close(writer)
    assert limits.bytes_in_flight == 0


# --- the body deadline ---------------------------------------------------------------------------

async def test__stalled_body__is_cut_off_after_the_deadline_while_others_are_served(emulator, start_proxy):
    server, _ = emulator
    proxy = await start_proxy(str(server.make_url("")), request_timeout=0.5)
    limits = proxy.server.app[LIMITS]
    reader, writer = await send_raw(proxy, head(1_000_000) + b'{"image": "iVBOR')  # then nothing

    reply = await upscale(proxy, {"image": b64(), "upscaling_resize": 2})  # others go on meanwhile
    assert reply["code"] == 0, reply
    assert (await poll_until_done(proxy, reply["data"]["task_id"]))["status"] == 2

    stalled = await read_reply(reader)  # before BOUND, or read_reply fails
    assert stalled["code"] == 9 and "did not arrive within 0.5 s" in stalled["msg"], stalled
    assert limits.bytes_in_flight == 0  # what it sent is let go
    await close(writer)
    assert (await upscale(proxy, {"image": b64(), "upscaling_resize": 2}))["code"] == 0


# --- the cap on calls waiting on V3 --------------------------------------------------------------

async def test__upstream_call_cap__sheds_with_code_5_while_v3_is_slow_and_polls_answer(start_emulator, start_proxy):
    server, _ = await start_emulator(latency=1.0)
    proxy = await start_proxy(str(server.make_url("")), max_upstream_calls=2)
    limits = proxy.server.app[LIMITS]
    body = {"image": b64(), "upscaling_resize": 2}
    first = await upscale(proxy, body)  # a task to poll later (1 s: V3 is slow)
    assert first["code"] == 0

    waiting = [asyncio.create_task(upscale(proxy, body)) for _ in range(2)]
    await until(lambda: limits.upstream_calls == 2, "two submissions waiting on V3")
    started = time.perf_counter()
    shed = await upscale(proxy, body)
    assert shed["code"] == 5 and "waiting on V3" in shed["msg"], shed
    assert time.perf_counter() - started < BOUND and not any(t.done() for t in waiting)  # at once
    poll = await v2_call(proxy, "GET", f"/v2/progress?task_id={first['data']['task_id']}")
    assert poll["code"] == 0, poll  # polls are not shed

    assert [(await t)["code"] for t in waiting] == [0, 0]
    assert (await upscale(proxy, body))["code"] == 0  # the places are given back
    async with proxy.get("/metrics") as resp:
        assert 'upscale_proxy_limits_refused_total{limit="upstream_calls"} 1.0' in await resp.text()


async def test__polls_answer_while_the_byte_budget_sheds_submissions(emulator, start_proxy):
    server, _ = emulator
    proxy = await start_proxy(str(server.make_url("")), max_inflight_mb=1)
    reply = await upscale(proxy, {"image": b64(), "upscaling_resize": 2})
    _, holder = await send_raw(proxy, head(1024 * 1024 - 100) + b"{")  # all but 100 bytes of the budget
    await until(lambda: proxy.server.app[LIMITS].bytes_in_flight > 0, "the budget to be taken")
    for _ in range(3):
        assert (await upscale(proxy, {"image": b64(), "upscaling_resize": 2}))["code"] == 5
        poll = await v2_call(proxy, "GET", f"/v2/progress?task_id={reply['data']['task_id']}")
        assert poll["code"] == 0, poll
    assert (await poll_until_done(proxy, reply["data"]["task_id"]))["status"] == 2
    await close(holder)


# --- the same limits on the /v3 pass-through and /_proxy/translate ---------------------------------

V3_SUBMIT, TRANSLATE = "/v3/async/upscale", "/_proxy/translate"


def v3_body() -> bytes:
    return orjson.dumps({"request": {"model_name": "RealESRNet_x4plus", "image_base64": b64(), "scale_factor": 2}})


async def served_after(proxy, emu) -> None:
    """A V3 submission through the pass-through and a translate preview are served (what was
    refused before has given its bytes and places back)."""
    tasks = len(emu.tasks)
    async with proxy.post(V3_SUBMIT, data=v3_body(), headers=AUTH) as resp:
        assert resp.status == 200, await resp.text()
    assert len(emu.tasks) == tasks + 1
    preview = await v2_call(proxy, "POST", TRANSLATE, json={"image": b64(), "upscaling_resize": 2})
    assert preview["code"] == 0, preview


async def test__stalled_body_on_v3_pass_through_and_translate__gets_the_deadline_answer_and_is_freed(
        emulator, start_proxy):
    server, emu = emulator
    proxy = await start_proxy(str(server.make_url("")), request_timeout=0.5)
    limits = proxy.server.app[LIMITS]
    v3_reader, v3_writer = await send_raw(proxy, head(1_000_000, path=V3_SUBMIT) + b'{"request": {')
    tr_reader, tr_writer = await send_raw(proxy, head(1_000_000, path=TRANSLATE) + b'{"image": "iVBOR')
    await until(lambda: limits.bytes_in_flight == 2_000_000, "both bodies to be counted")

    status, headers, body = await read_response(v3_reader)  # before BOUND, or it fails
    assert (status, body) == (408, {"code": 408, "reason": "REQUEST_TIMEOUT", "metadata": {},
                                    "message": "the request body did not arrive within 0.5 s"})
    assert headers["connection"] == "close"
    reply = await read_reply(tr_reader)
    assert reply["code"] == 9 and "did not arrive within 0.5 s" in reply["msg"], reply
    assert (limits.bytes_in_flight, limits.upstream_calls) == (0, 0)  # what they sent is let go
    assert len(emu.tasks) == 0  # the upstream call of the cut body was dropped: no task
    await close(v3_writer)
    await close(tr_writer)
    await served_after(proxy, emu)


async def test__past_the_byte_budget__v3_pass_through_and_translate_are_refused_before_their_body(
        emulator, start_proxy):
    server, emu = emulator
    proxy = await start_proxy(str(server.make_url("")), max_inflight_mb=1)
    limits = proxy.server.app[LIMITS]
    _, holder = await send_raw(proxy, head(700_000) + b'{"image": "')  # 700 KB of the budget, and stalls
    await until(lambda: limits.bytes_in_flight == 700_000, "the first submission to be counted")

    v3_reader, v3_writer = await send_raw(proxy, head(700_000, path=V3_SUBMIT))  # no body: the answer can't wait
    status, headers, body = await read_response(v3_reader)
    assert status == 503 and body["code"] == 503 and body["reason"] == "PROXY_OVERLOADED", body
    assert body["message"].startswith("the proxy is overloaded") and "in flight" in body["message"], body
    assert headers["connection"] == "close"
    tr_reader, tr_writer = await send_raw(proxy, head(700_000, path=TRANSLATE))
    reply = await read_reply(tr_reader)
    assert reply["code"] == 5 and "in flight" in reply["msg"], reply
    assert len(emu.tasks) == 0 and limits.bytes_in_flight == 700_000
    async with proxy.get("/metrics") as resp:
        assert 'upscale_proxy_limits_refused_total{limit="bytes"} 2.0' in await resp.text()

    for writer in (v3_writer, tr_writer, holder):
        await close(writer)
    await until(lambda: limits.bytes_in_flight == 0, "the stalled submission to let go of its bytes")
    await served_after(proxy, emu)  # the budget is given back
    assert (limits.bytes_in_flight, limits.upstream_calls) == (0, 0)


async def test__v3_pass_through__cuts_a_chunked_body_where_it_crosses_the_budget_and_refuses_a_larger_one(
        emulator, start_proxy):
    server, emu = emulator
    proxy = await start_proxy(str(server.make_url("")), max_inflight_mb=1)
    limits = proxy.server.app[LIMITS]
    reader, writer = await send_raw(proxy, head(chunked=True, path=V3_SUBMIT))
    for _ in range(20):  # 20 chunks of 64 KiB: past 1 MiB at the 17th, while V3 has the first ones
        writer.write(b"10000\r\n" + b" " * 0x10000 + b"\r\n")
    await writer.drain()
    status, _, body = await read_response(reader)
    assert status == 503 and body["reason"] == "PROXY_OVERLOADED" and "in flight" in body["message"], body
    await close(writer)

    reader, writer = await send_raw(proxy, head(2 * 1024 * 1024, path=V3_SUBMIT))  # more than the whole budget
    status, _, body = await read_response(reader)
    assert status == 413 and body["reason"] == "REQUEST_BODY_TOO_LARGE", body
    await close(writer)
    assert (limits.bytes_in_flight, limits.upstream_calls, len(emu.tasks)) == (0, 0, 0)
    await served_after(proxy, emu)


async def test__v3_pass_through_submissions__take_a_place_under_the_call_cap_and_its_polls_do_not(
        start_emulator, start_proxy):
    server, _ = await start_emulator(latency=1.0)
    proxy = await start_proxy(str(server.make_url("")), max_upstream_calls=1)
    limits = proxy.server.app[LIMITS]
    waiting = asyncio.create_task(upscale(proxy, {"image": b64(), "upscaling_resize": 2}))
    await until(lambda: limits.upstream_calls == 1, "a V2 submission waiting on V3")
    async with proxy.post(V3_SUBMIT, data=v3_body(), headers=AUTH) as resp:
        assert resp.status == 503 and "waiting on V3" in (await resp.json())["message"]
    async with proxy.get("/v3/async/task-result", params={"task_id": "nope"}, headers=AUTH) as resp:
        assert resp.status == 404  # a poll is not refused: V3 answered it
    task_id = (await waiting)["data"]["task_id"]
    async with proxy.post(V3_SUBMIT, data=v3_body(), headers=AUTH) as resp:
        assert resp.status == 200, await resp.text()  # the place is given back
    assert task_id and limits.upstream_calls == 0


# --- the emulator's store ------------------------------------------------------------------------

async def v3_submit(client, image: str) -> str:
    async with client.post("/v3/async/upscale", headers=AUTH, json={
            "request": {"model_name": "RealESRNet_x4plus", "image_base64": image, "scale_factor": 2}}) as resp:
        assert resp.status == 200, await resp.text()
        return (await resp.json())["task_id"]


async def v3_status(client, task_id: str) -> int:
    async with client.get("/v3/async/task-result", params={"task_id": task_id}, headers=AUTH) as resp:
        return resp.status


async def test__emulator_store__keeps_at_most_max_tasks_the_oldest_dropped_first(emulator, aiohttp_client):
    server, emu = emulator
    client = await aiohttp_client(server)
    emu.tasks.max_tasks = 3
    ids = [await v3_submit(client, b64()) for _ in range(5)]
    assert len(emu.tasks) == 3
    assert [await v3_status(client, task_id) for task_id in ids] == [404, 404, 200, 200, 200]


async def test__emulator_store__keeps_at_most_max_bytes_of_images(emulator, aiohttp_client):
    server, emu = emulator
    client = await aiohttp_client(server)
    image = noise_b64(200)
    size = len(base64.b64decode(image))
    emu.tasks.max_bytes = int(2.5 * size)
    ids = [await v3_submit(client, image) for _ in range(5)]
    assert len(emu.tasks) == 2 and emu.tasks.bytes == 2 * size
    assert [await v3_status(client, task_id) for task_id in ids] == [404, 404, 404, 200, 200]


async def test__emulator_store__drops_the_input_once_upscaled_and_the_result_once_expired(
        start_emulator, aiohttp_client):
    server, emu = await start_emulator(image_url_ttl=1)
    client = await aiohttp_client(server)
    task_id = await v3_submit(client, b64())
    assert emu.tasks.bytes == len(base64.b64decode(b64()))
    async with asyncio.timeout(BOUND):
        while True:
            async with client.get("/v3/async/task-result", params={"task_id": task_id}, headers=AUTH) as resp:
                doc = await resp.json()
            if doc["task"]["status"] == "TASK_STATUS_SUCCEED":
                break
            await asyncio.sleep(0.02)
    task = emu.tasks[task_id]
    assert task.image == b"" and emu.tasks.bytes == len(task.result)  # the input is gone

    emu.sweep(task.completes + 2)  # its URL has expired: the result goes, the task stays a while
    assert task.result is None and emu.tasks.bytes == 0
    assert await v3_status(client, task_id) == 200
    emu.sweep(task.completes + 120)
    assert len(emu.tasks) == 0


# --- memory: kept while a load lasts, given back when idle ----------------------------------------

_REUSE = """
import resource, sys
from proxy import limits
kept = limits.keep_freed_memory() if sys.argv[1] == "keep" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def submission():  # a 4 MiB body, and what is made of it, freed when it is answered
    body = bytearray(4 << 20)
    copy = bytearray(body)
    del body, copy
for _ in range(3):  # warm up: glibc adjusts its thresholds to the first blocks freed
    submission()
before = faults()
for _ in range(20):  # one after the other, as at c=1
    submission()
print(kept, faults() - before)
"""


def test__freed_bodies__are_reused_without_fresh_page_faults_only_when_kept():
    """By default glibc gives the 8 MiB a submission freed back to the kernel (the top of its heap
    passes the trim threshold), and the next one faults in 2,048 fresh pages; `keep_freed_memory`
    keeps it for the next body (trim_memory gives it back once idle)."""
    import subprocess
    import sys as _sys
    runs = {mode: subprocess.run([_sys.executable, "-c", _REUSE, mode], capture_output=True, text=True,
                                 check=True, env={"PATH": ""}).stdout.split() for mode in ("keep", "default")}
    if runs["keep"][0] != "True":
        pytest.skip("not glibc: no mallopt")
    assert int(runs["default"][1]) > 20 * 2000  # every body in fresh pages
    assert int(runs["keep"][1]) < 20 * 100  # each body in the pages the last one left
