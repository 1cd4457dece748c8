"""The task engine: composed tasks move on in the background; polls answer at once from what is
stored, never wait for V3, a fetch or a composition; progress only moves forward; failures that
can't heal end the task at once; a rate limit is waited out; another process takes a task over;
running tasks are capped; a charged V3 job is never left without its task; an outage is waited
out up to a grace, never with a back-off past the breaker's cool-down. The task store's own
contract (leases, due tasks, the cap, wakes) is tests/test_stores.py, over both backends."""

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

from concurrent.futures import ThreadPoolExecutor

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy.compose.engine import EngineSettings, TaskEngine
from proxy.compose.fetch import AllowedOrigins, ImageFetcher
from proxy.compose.task import ComposedTask, TaskState, is_composed_id
from proxy.keys import TASK_STORE, TASKS
from proxy.mappings import load
from proxy.stores import FileResultStore, ResultStore, SqliteTaskStore, TaskRecord
from proxy.stores.redis import RedisResultStore, connect
from proxy.translate.plan import Plan
from proxy.translate.steps import ReadInput
from proxy.v2.body import split_image
from proxy.v2.translation import Translator
from proxy.v3.breaker import CircuitBreaker
from proxy.v3.client import V3Client
from tests.helpers import (
    AUTH,
    KEY,
    free_port,
    poll_until_done,
    recording_host,
    upscale,
    v2_call,
    wait_for_port,
)
from tests.images import encode, pattern
from tests.redis_server import RedisServer, redis_server_binary


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


# --- how many run at once ---------------------------------------------------------------------------

async def test__past_the_running_task_cap__a_submission_gets_code_5_before_v3_is_asked(start_emulator,
                                                                                       start_proxy, tmp_path):
    server, emu = await start_emulator(queue_delay=0, process_delay=0.5)
    client = await start_proxy(str(server.make_url("")), compose_max_tasks=1)
    first = await upscale(client, body(upscaler_1="4x-UltraSharp", upscaling_resize=6))
    refused = await upscale(client, body(upscaler_1="4x-UltraSharp", upscaling_resize=6))
    assert first["code"] == 0 and (refused["code"], refused["data"]) == (5, None)
    assert "UPSCALE_PROXY_COMPOSE_MAX_TASKS" in refused["msg"]
    assert emu.requests["submit"] == 1  # nothing sent for the refused one, so nothing charged
    assert [p.name for p in (tmp_path / "data" / "results").iterdir()] == [f"{first['data']['task_id']}.input"]
    assert (await poll_until_done(client, first["data"]["task_id"]))["status"] == 2
    again = await upscale(client, body(upscaler_1="Lanczos", upscaling_resize=3))  # the place is free again
    assert again["code"] == 0 and (await poll_until_done(client, again["data"]["task_id"]))["status"] == 2


# --- two branches: V3 takes one and turns the other away -------------------------------------------------

TWO_BRANCHES = {"upscaler_1": "4x-UltraSharp", "upscaling_resize": 2, "upscaler_2": "R-ESRGAN 4x+ Anime6B",
                "extras_upscaler_2_visibility": 0.5}
SECOND_CALL_ONLY = {"seed": 10, "error_rate": 0.5, "error_limit": 1, "error_endpoints": ["submit"]}  # dice: 0.57, 0.43


async def stored(client, task_id: str) -> ComposedTask:
    return ComposedTask.from_record(await client.server.app[TASK_STORE].get(task_id))


async def test__two_branches__a_refused_first_branch_is_the_clients_error_and_nothing_is_charged(
        start_emulator, start_proxy):
    server, emu = await start_emulator(error_reason="BILLING_BALANCE_NOT_ENOUGH", error_limit=1,
                                       error_endpoints=["submit"])
    client = await start_proxy(str(server.make_url("")))
    reply = await upscale(client, body(**TWO_BRANCHES))
    assert (reply["code"], reply["data"]) == (7, None) and "BILLING_BALANCE_NOT_ENOUGH" in reply["msg"]
    assert emu.requests["submit"] == 1 and len(emu.tasks) == 0  # the second branch was never sent


async def test__two_branches__a_refused_second_branch_ends_the_task_that_keeps_the_charged_job(
        start_emulator, start_proxy):
    server, emu = await start_emulator(error_reason="FEATURE_NOT_ALLOWED", **SECOND_CALL_ONLY)
    client = await start_proxy(str(server.make_url("")))
    reply = await upscale(client, body(**TWO_BRANCHES))
    assert reply["code"] == 0
    data = await poll(client, reply["data"]["task_id"])  # the first poll says why
    assert data["status"] == 3
    assert data["failed_reason"] == "V3 refused a job: FEATURE_NOT_ALLOWED: injected by the emulator"
    assert (emu.requests["submit"], emu.injected, len(emu.tasks)) == (2, 1, 1)
    [[accepted], []] = (await stored(client, reply["data"]["task_id"])).jobs
    assert emu.tasks.get(accepted) is not None  # the one job V3 took is the failed task's, not an orphan


async def test__two_branches__a_rate_limited_second_branch_is_submitted_later_by_the_worker(
        start_emulator, start_proxy):
    server, emu = await start_emulator(error_reason="RATE_LIMIT_EXCEEDED", **SECOND_CALL_ONLY)
    client = await start_proxy(str(server.make_url("")))
    reply = await upscale(client, body(**TWO_BRANCHES))
    assert reply["code"] == 0
    assert (await poll_until_done(client, reply["data"]["task_id"]))["status"] == 2
    assert (emu.requests["submit"], emu.injected, len(emu.tasks)) == (3, 1, 2)


# --- V3 out of reach: the engine on a clock the test moves ---------------------------------------------

class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


ONE_JOB_AND_A_CROP = {"upscaler_1": "4x-UltraSharp", "resize_mode": 1, "upscaling_resize_w": 30,
                      "upscaling_resize_h": 20, "upscaling_crop": True}


@pytest.fixture
async def engines(tmp_path):
    """`make(upstream, clock)`: a TaskEngine wired as the app wires it, on one SQLite task store and
    one results folder in tmp_path (each call another process on the same data), with its own V3
    client and breaker on the test's clock. Its steps are taken by the test (`step`), not a worker."""
    sessions, stores = [], []
    executor = ThreadPoolExecutor(2)

    async def make(upstream: str, clock: Clock, breaker_failures: int = 5, results: ResultStore | None = None,
                   **settings) -> TaskEngine:
        session = aiohttp.ClientSession()
        sessions.append(session)
        tasks = SqliteTaskStore(tmp_path / "tasks.sqlite3")
        stores.append(tasks)
        v3 = V3Client(session, upstream, retries=0, breaker=CircuitBreaker(breaker_failures, 10, clock=clock))
        fetcher = ImageFetcher(session, AllowedOrigins.configure(upstream), 10**8, 10)
        return TaskEngine(v3, tasks, results or FileResultStore(tmp_path / "results"), fetcher, executor,
                          EngineSettings(deadline=10_000, lease=60, max_pending=2, **settings),
                          load().task_status, clock=clock)

    yield make
    for session in sessions:
        await session.close()
    for tasks in stores:
        await tasks.close()
    executor.shutdown()


async def submit(engine: TaskEngine, fields: dict) -> str:
    doc, image_b64, head = split_image(orjson.dumps(body(**fields)))
    translation = Translator(load()).translate(doc, image_b64, head)
    task_id, _ = await engine.submit(translation.plan, translation.image_b64, KEY, "fp")
    return task_id


async def step(engine: TaskEngine, task_id: str, clock: Clock, at: float | None = None) -> ComposedTask:
    """One step of the task at `at` (default: when it is due); -> the task as stored after it."""
    task = ComposedTask.from_record(await engine._tasks.get(task_id))
    clock.now = task.due_at if at is None else at
    await engine._step(task_id)
    return ComposedTask.from_record(await engine._tasks.get(task_id))


async def test__v3_out_of_reach_past_the_grace__fails_the_task_saying_so(start_emulator, engines):
    server, _ = await start_emulator(error_reason="SERVICE_NOT_AVAILABLE", error_endpoints=["result"])
    clock = Clock()
    engine = await engines(str(server.make_url("")), clock, outage_grace=300)
    task_id = await submit(engine, ONE_JOB_AND_A_CROP)
    since = (await step(engine, task_id, clock)).unreachable_since
    assert since == clock.now
    for tries, later in enumerate((100, 200, 299), start=2):  # waited out, however many tries it takes
        task = await step(engine, task_id, clock, at=since + later)
        assert (task.state, task.unreachable_since, task.retries) == (TaskState.RUNNING, since, tries)
        assert task.due_at <= since + 300  # it is looked at again by the end of the grace
    task = await step(engine, task_id, clock, at=since + 300)
    assert task.state == TaskState.FAILED
    assert task.reason == ("V3 could not be reached for 300 s: V3 answered HTTP 503: SERVICE_NOT_AVAILABLE: "
                           "injected by the emulator")
    data = await engine.progress(task_id, KEY, "fp", "http://proxy.example/image.png")
    assert (data["status"], data["failed_reason"]) == (3, task.reason)


async def test__v3_out_of_reach_for_less_than_the_grace__is_waited_out_and_the_task_finishes(
        start_emulator, engines):
    server, emu = await start_emulator(error_reason="SERVICE_NOT_AVAILABLE", error_endpoints=["result"],
                                       error_limit=2, queue_delay=0, process_delay=0)
    clock = Clock()
    engine = await engines(str(server.make_url("")), clock, outage_grace=300)
    task_id = await submit(engine, ONE_JOB_AND_A_CROP)
    since = (await step(engine, task_id, clock)).unreachable_since
    await step(engine, task_id, clock, at=since + 250)
    task = await step(engine, task_id, clock, at=since + 299)  # V3 answers: the outage is over
    assert emu.injected == 2 and (task.unreachable_since, task.retries) == (None, 0)
    assert task.state == TaskState.SUCCEEDED


async def test__a_process_taking_a_task_over__carries_on_its_outage_clock(start_emulator, engines):
    server, emu = await start_emulator(error_reason="SERVICE_NOT_AVAILABLE", error_endpoints=["result"])
    clock = Clock()
    first = await engines(str(server.make_url("")), clock, outage_grace=300)
    task_id = await submit(first, ONE_JOB_AND_A_CROP)
    since = (await step(first, task_id, clock)).unreachable_since
    await step(first, task_id, clock, at=since + 100)
    second = await engines(str(server.make_url("")), clock, outage_grace=300)  # the first is gone
    await second.progress(task_id, KEY, "fp", "http://proxy.example/image.png")  # a poll brings the key
    task = await step(second, task_id, clock, at=since + 200)
    assert (task.state, task.unreachable_since) == (TaskState.RUNNING, since)
    task = await step(second, task_id, clock, at=since + 300)
    assert task.state == TaskState.FAILED and task.reason.startswith("V3 could not be reached for 300 s")
    assert emu.injected == 4  # four looks in all, two by each process


def test__a_task_stored_before_the_outage_clock__still_loads():
    task = ComposedTask(task_id="t", fingerprint="fp", plan=Plan(profile="v1.3", input_size=(1, 1),
                        output_size=(1, 1), read=ReadInput()), created=0, deadline=100, due_at=5, purge_at=200)
    doc = orjson.loads(task.record().doc)
    del doc["unreachable_since"]
    old = TaskRecord("t", orjson.dumps(doc).decode(), True, 5, 200)
    assert ComposedTask.from_record(old) == task


@pytest.mark.parametrize("breaker_failures, longest", [(1, 10), (0, 30)])
async def test__while_the_breaker_is_open__no_back_off_is_longer_than_its_cool_down(
        start_emulator, engines, breaker_failures, longest):
    """A breaker that opens at the first failure (cool-down 10 s), against one that never opens."""
    server, _ = await start_emulator(error_reason="GATEWAY_TIMEOUT", error_endpoints=["result"])
    clock = Clock()
    engine = await engines(str(server.make_url("")), clock, breaker_failures=breaker_failures)
    task_id = await submit(engine, ONE_JOB_AND_A_CROP)
    waits = []
    for _ in range(10):
        task = await step(engine, task_id, clock)
        waits.append(task.due_at - clock.now)
    assert task.retries == 10 and max(waits) <= longest
    assert max(waits) > 10 or breaker_failures  # without the breaker, back-offs grow past the cool-down


async def test__the_store_failing_mid_step__keeps_the_task_running_and_its_next_step_finishes_it(
        start_emulator, engines, tmp_path):
    """A Redis blip while a task is composed (its input can't be read) is the store's, not the
    task's: the step is not saved, the task stays running, and this process takes it again at once
    (the lease it still holds is its own) instead of waiting the lease out."""
    redis = RedisServer(redis_server_binary(), tmp_path / "redis")
    redis.start()
    try:
        server, _ = await start_emulator(queue_delay=0, process_delay=0)
        clock = Clock()
        async with connect(redis.url, timeout=1) as client:
            engine = await engines(str(server.make_url("")), clock, results=RedisResultStore(client, "t:"))
            task_id = await submit(engine, ONE_JOB_AND_A_CROP)
            await asyncio.sleep(0.1)  # its V3 job is done: the next step composes
            redis.stop(keep=True)
            task = await step(engine, task_id, clock)
            assert task.state == TaskState.RUNNING
            redis.start()
            task = await step(engine, task_id, clock, at=clock.now + 1)  # within the lease it took
            assert task.state == TaskState.SUCCEEDED, task.reason
    finally:
        redis.stop()
