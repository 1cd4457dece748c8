"""The stores' contract, one suite for every backend (SQLite and files; Redis on a real server),
with times passed in; then replicas on one Redis, over HTTP: a task is composed once whichever
replica is polled, running tasks are capped across replicas, and polls ride through a Redis
outage until Redis is back."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest

from proxy.compose.task import ComposedTask, TaskState
from proxy.stores import FileResultStore, ResultStore, SqliteTaskStore, TaskStore
from proxy.stores.redis import RedisResultStore, RedisTaskStore, connect
from proxy.translate.plan import Plan
from proxy.translate.steps import ReadInput
from tests.helpers import (
    AUTH,
    free_port,
    poll_until_done,
    upscale,
    v2_call,
    wait_for_port,
)
from tests.images import encode, pattern
from tests.redis_server import RedisServer, redis_server_binary


def stored_task(task_id: str, due_at: float, purge_at: float = 200) -> ComposedTask:
    plan = Plan(profile="v1.3", input_size=(1, 1), output_size=(1, 1), read=ReadInput())
    return ComposedTask(task_id=task_id, fingerprint="fp", plan=plan, created=0, deadline=100, due_at=due_at,
                        purge_at=purge_at)


@pytest.fixture(params=["sqlite+files", "redis"])
async def stores(request, tmp_path) -> AsyncIterator[tuple[TaskStore, ResultStore]]:
    if request.param == "sqlite+files":
        tasks = SqliteTaskStore(tmp_path / "tasks.sqlite3")
        yield tasks, FileResultStore(tmp_path / "results")
        await tasks.close()
        return
    server = request.getfixturevalue("redis_server")
    prefix = f"test-{uuid.uuid4().hex}:"  # a fresh store on the module's server
    async with connect(server.url, timeout=5) as client:
        tasks = RedisTaskStore(client, prefix)
        yield tasks, RedisResultStore(client, prefix)
        await tasks.close()


async def test__task_store__gives_back_what_was_created(stores):
    tasks, _ = stores
    assert await tasks.get("a") is None
    task = stored_task("a", due_at=5)
    await tasks.create(task.record())
    assert ComposedTask.from_record(await tasks.get("a")) == task


async def test__task_store__a_lease_is_held_until_it_lapses_then_taken_over(stores):
    tasks, _ = stores
    await tasks.create(stored_task("a", due_at=5).record())
    assert not await tasks.acquire("missing", "one", now=10, seconds=30)
    assert await tasks.acquire("a", "one", now=10, seconds=30)
    assert not await tasks.acquire("a", "two", now=20, seconds=30)  # still held
    assert not await tasks.acquire("a", "two", now=40, seconds=30)  # held up to its last instant
    assert await tasks.acquire("a", "one", now=25, seconds=30)  # by its holder: again (a step cut short)
    assert not await tasks.acquire("a", "two", now=41, seconds=30)  # ... and held 30 s from then
    assert await tasks.acquire("a", "two", now=56, seconds=30)  # lapsed: taken over


async def test__task_store__a_write_under_a_lapsed_lease_does_not_take(stores):
    tasks, _ = stores
    task = stored_task("a", due_at=5)
    await tasks.create(task.record())
    assert await tasks.acquire("a", "one", now=10, seconds=30)
    assert await tasks.acquire("a", "two", now=41, seconds=30)
    task.reason = "written by one"
    assert not await tasks.save(task.record(), "one")
    assert ComposedTask.from_record(await tasks.get("a")).reason == ""
    task.reason = "written by two"
    assert await tasks.save(task.record(), "two")
    assert ComposedTask.from_record(await tasks.get("a")).reason == "written by two"
    assert not await tasks.save(task.record(), "two")  # saving gave the lease back
    assert await tasks.acquire("a", "three", now=42, seconds=30)


async def test__task_store__only_the_holder_releases_a_lease(stores):
    tasks, _ = stores
    await tasks.create(stored_task("a", due_at=5).record())
    assert await tasks.acquire("a", "one", now=10, seconds=30)
    await tasks.release("a", "two")
    assert not await tasks.acquire("a", "two", now=11, seconds=30)
    await tasks.release("a", "one")
    assert await tasks.acquire("a", "two", now=11, seconds=30)


async def test__task_store__due_tasks_are_running_past_their_time_and_free_most_overdue_first(stores):
    tasks, _ = stores
    for task_id, due_at in (("later", 3), ("late", 1), ("future", 50), ("now", 10)):
        await tasks.create(stored_task(task_id, due_at).record())
    done = stored_task("done", 0)
    done.state = TaskState.SUCCEEDED
    await tasks.create(done.record())
    assert await tasks.due(now=10, limit=10) == ["late", "later", "now"]
    assert await tasks.acquire("late", "me", now=10, seconds=5)
    assert await tasks.due(now=10, limit=10) == ["later", "now"]
    assert await tasks.due(now=10, limit=1) == ["later"]
    assert await tasks.due(now=16, limit=10) == ["late", "later", "now"]  # its lease lapsed


async def test__task_store__a_task_saved_as_ended_is_no_longer_due(stores):
    tasks, _ = stores
    task = stored_task("a", due_at=1)
    await tasks.create(task.record())
    assert await tasks.acquire("a", "me", now=10, seconds=5)
    task.due_at = 20
    assert await tasks.save(task.record(), "me")
    assert await tasks.due(now=10, limit=10) == []
    assert await tasks.due(now=20, limit=10) == ["a"]
    assert await tasks.acquire("a", "me", now=20, seconds=5)
    task.state = TaskState.SUCCEEDED
    assert await tasks.save(task.record(), "me")
    assert await tasks.due(now=100, limit=10) == []


async def test__task_store__a_capped_create_counts_the_running_tasks(stores):
    tasks, _ = stores
    assert await tasks.create(stored_task("a", due_at=5).record(), max_running=2)
    assert await tasks.create(stored_task("b", due_at=5).record(), max_running=2)
    assert not await tasks.create(stored_task("c", due_at=5).record(), max_running=2)
    assert await tasks.get("c") is None and await tasks.due(now=10, limit=10) == ["a", "b"]
    done = stored_task("a", due_at=5)
    done.state = TaskState.SUCCEEDED
    assert await tasks.acquire("a", "me", now=10, seconds=5) and await tasks.save(done.record(), "me")
    assert await tasks.create(stored_task("c", due_at=5).record(), max_running=2)  # an ended task frees its place
    assert await tasks.create(stored_task("d", due_at=5).record())  # no cap given: none applies


async def test__task_store__a_wake_makes_a_running_task_due_and_never_later(stores):
    tasks, _ = stores
    await tasks.create(stored_task("a", due_at=50).record())
    await tasks.create(stored_task("b", due_at=5).record())
    await tasks.wake("a", 10)
    await tasks.wake("b", 20)  # due earlier already: it stays so
    await tasks.wake("missing", 10)
    assert await tasks.due(now=10, limit=10) == ["b", "a"]
    done = stored_task("c", due_at=50)
    done.state = TaskState.FAILED
    await tasks.create(done.record())
    await tasks.wake("c", 10)  # an ended task is never due
    assert await tasks.due(now=10, limit=10) == ["b", "a"]


async def test__task_store__a_wake_during_a_lease_outlives_the_holders_save(stores):
    tasks, _ = stores
    task = stored_task("a", due_at=5)
    await tasks.create(task.record())
    assert await tasks.acquire("a", "me", now=10, seconds=30)
    await tasks.wake("a", 12)  # the holder's step may have looked before it came
    task.due_at = 100
    assert await tasks.save(task.record(), "me")
    assert await tasks.due(now=12, limit=10) == ["a"]
    await tasks.wake("a", 12)  # a wake before the lease is the next step's to see: it is spent
    assert await tasks.acquire("a", "me", now=12, seconds=30)
    assert await tasks.save(task.record(), "me")
    assert await tasks.due(now=12, limit=10) == [] and await tasks.due(now=100, limit=10) == ["a"]


async def test__task_store__purgeable_tasks_are_past_their_purge_time(stores):
    tasks, _ = stores
    await tasks.create(stored_task("old", due_at=1, purge_at=50).record())
    await tasks.create(stored_task("young", due_at=1, purge_at=150).record())
    assert await tasks.purgeable(now=50) == []
    assert await tasks.purgeable(now=51) == ["old"]
    assert sorted(await tasks.purgeable(now=151)) == ["old", "young"]


async def test__task_store__a_deleted_task_is_gone_everywhere(stores):
    tasks, _ = stores
    await tasks.create(stored_task("a", due_at=1, purge_at=50).record())
    await tasks.delete("a")
    await tasks.delete("a")  # twice is no error
    assert await tasks.get("a") is None
    assert await tasks.due(now=100, limit=10) == []
    assert await tasks.purgeable(now=100) == []
    assert not await tasks.acquire("a", "me", now=100, seconds=5)


async def test__result_store__puts_gets_and_deletes_blobs(stores):
    _, results = stores
    assert await results.get("a.png") is None
    await results.put("a.png", b"\x89PNG one")
    await results.put("a.png", b"\x89PNG two")
    await results.put("a.input", b"in", ttl=3600)
    assert (await results.get("a.png"), await results.get("a.input")) == (b"\x89PNG two", b"in")
    await results.delete("a.png")
    await results.delete("a.png")
    assert await results.get("a.png") is None


async def test__redis_result_store__a_blob_with_a_ttl_expires_by_itself(redis_server):
    prefix = f"test-{uuid.uuid4().hex}:"
    async with connect(redis_server.url, timeout=5) as client:
        results = RedisResultStore(client, prefix)
        await results.put("a.png", b"png", ttl=1)
        await results.put("b.png", b"png")
        assert 0 < await client.pttl(f"{prefix}blob:a.png") <= 1000
        assert await client.pttl(f"{prefix}blob:b.png") == -1  # no TTL: kept until deleted
        for _ in range(40):
            if await results.get("a.png") is None:
                break
            await asyncio.sleep(0.05)
        assert await results.get("a.png") is None


# --- replicas on one Redis, over HTTP -----------------------------------------------------------------

def composed_body() -> dict:
    return {"image": base64.b64encode(encode(pattern(9, 9))).decode(), "upscaling_resize": 6}


async def replica(start_proxy, upstream: str, redis_url: str, prefix: str, data_dir, **overrides):
    return await start_proxy(upstream, redis_url=redis_url, redis_prefix=prefix, fingerprint_secret="shared secret",
                             data_dir=data_dir, **overrides)


async def test__two_replicas__a_task_submitted_to_one_and_polled_on_both__is_composed_once(
        redis_server, start_emulator, start_proxy, tmp_path, log_lines):
    server, emu = await start_emulator()
    upstream, prefix = str(server.make_url("")), f"test-{uuid.uuid4().hex}:"
    first = await replica(start_proxy, upstream, redis_server.url, prefix, tmp_path / "a")
    second = await replica(start_proxy, upstream, redis_server.url, prefix, tmp_path / "b")
    three_passes = {"image": base64.b64encode(encode(pattern(5, 3))).decode(), "upscaler_1": "4x-UltraSharp",
                    "upscaling_resize": 20}
    reply = await upscale(first, three_passes)
    task_id = reply["data"]["task_id"]
    on_second = await v2_call(second, "GET", f"/v2/progress?task_id={task_id}")
    assert on_second["code"] == 0, on_second
    done = await asyncio.gather(poll_until_done(first, task_id), poll_until_done(second, task_id))
    assert [d["status"] for d in done] == [2, 2]
    assert [line["task_id"] for line in log_lines if line["event"] == "composed"] == [task_id]
    assert emu.requests["submit"] == 3  # each pass submitted once, whichever replica did it
    async with second.get(f"/v2/images/{task_id}.png") as resp:  # the image is in Redis, for both
        assert resp.status == 200 and (await resp.read()).startswith(b"\x89PNG")
    assert not (tmp_path / "a" / "tasks.sqlite3").exists()


async def test__two_replicas__share_one_cap_on_running_composed_tasks(redis_server, start_emulator, start_proxy,
                                                                      tmp_path):
    server, emu = await start_emulator(queue_delay=0, process_delay=0.5)
    upstream, prefix = str(server.make_url("")), f"test-{uuid.uuid4().hex}:"
    first, second = [await replica(start_proxy, upstream, redis_server.url, prefix, tmp_path / name,
                                   compose_max_tasks=1) for name in "ab"]
    reply = await upscale(first, composed_body())
    refused = await upscale(second, composed_body())
    assert reply["code"] == 0 and refused["code"] == 5 and "UPSCALE_PROXY_COMPOSE_MAX_TASKS" in refused["msg"]
    assert emu.requests["submit"] == 1  # the refused one never reached V3
    assert (await poll_until_done(second, reply["data"]["task_id"]))["status"] == 2
    assert (await upscale(second, composed_body()))["code"] == 0  # its place is free again, for every replica


async def test__a_replica_killed_mid_task__another_replica_on_the_same_redis_finishes_it(
        redis_server, start_emulator, start_proxy, tmp_path):
    """SIGKILL a real `serve` process with a task in flight; a poll to another replica (another
    data directory, the same Redis) brings the key there, and that replica finishes the task."""
    server, emu = await start_emulator(queue_delay=0.1, process_delay=0.4)
    upstream, prefix, port = str(server.make_url("")), f"test-{uuid.uuid4().hex}:", free_port()
    env = {**os.environ, "UPSCALE_PROXY_DATA_DIR": str(tmp_path / "a"), "UPSCALE_PROXY_REDIS_URL": redis_server.url,
           "UPSCALE_PROXY_REDIS_PREFIX": prefix, "UPSCALE_PROXY_FINGERPRINT_SECRET": "shared secret",
           "UPSCALE_PROXY_TASK_LEASE": "1"}
    first = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--port", str(port), "--upstream", upstream],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await wait_for_port(port)
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{port}/v2/upscale", headers=AUTH, json={
                    "image": base64.b64encode(encode(pattern(5, 3))).decode(), "upscaler_1": "4x-UltraSharp",
                    "upscaling_resize": 20}) as resp:
                task_id = (await resp.json())["data"]["task_id"]
            await asyncio.sleep(0.7)  # the first pass is done and the second submitted, by the first replica
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    second = await replica(start_proxy, upstream, redis_server.url, prefix, tmp_path / "b", task_lease=1)
    data = await poll_until_done(second, task_id)
    assert data["status"] == 2
    assert emu.requests["submit"] == 3  # each pass submitted once, whichever replica did it


async def readiness(client) -> tuple[int, dict]:
    async with client.get("/readyz") as resp:
        return resp.status, await resp.json()


async def test__redis_restarted_mid_task__polls_answer_the_last_known_state_then_the_task_completes(
        start_emulator, start_proxy, tmp_path):
    """And /readyz says the store is unreachable meanwhile, but stays 200: Redis is every
    replica's, and the direct path needs none of it."""
    redis = RedisServer(redis_server_binary(), tmp_path / "redis")
    redis.start()
    try:
        server, _ = await start_emulator(queue_delay=0.3, process_delay=0.3)
        client = await replica(start_proxy, str(server.make_url("")), redis.url, "restart:", tmp_path / "data",
                               task_lease=1)
        reply = await upscale(client, composed_body())
        task_id = reply["data"]["task_id"]
        assert await readiness(client) == (200, {"status": "ready", "task_store": "ok"})
        before = await v2_call(client, "GET", f"/v2/progress?task_id={task_id}")
        redis.stop(keep=True)
        during = await v2_call(client, "GET", f"/v2/progress?task_id={task_id}")  # polls ride through it
        assert (during["code"], during["data"]) == (0, before["data"]), during
        assert await readiness(client) == (200, {"status": "ready", "task_store": "unreachable"})
        redis.start()
        done = await poll_until_done(client, task_id)
        assert done["status"] == 2, done
        assert await readiness(client) == (200, {"status": "ready", "task_store": "ok"})
    finally:
        redis.stop()


def test__settings__redis_needs_a_redis_url_and_a_shared_fingerprint_secret():
    from pydantic import ValidationError

    from proxy.settings import Settings

    with pytest.raises(ValidationError, match="UPSCALE_PROXY_REDIS_URL needs UPSCALE_PROXY_FINGERPRINT_SECRET"):
        Settings(redis_url="redis://127.0.0.1:6379/0")
    with pytest.raises(ValidationError, match="redis:// or rediss://"):
        Settings(redis_url="http://127.0.0.1:6379/0", fingerprint_secret="s")
    assert Settings(redis_url="rediss://cache:6380/1", fingerprint_secret="s").redis_url is not None


def test__serve_with_redis_and_no_fingerprint_secret__exits_2_naming_both(tmp_path):
    env = {name: value for name, value in os.environ.items() if not name.startswith("UPSCALE_PROXY_")}
    env.update(UPSCALE_PROXY_REDIS_URL="redis://127.0.0.1:1/0", UPSCALE_PROXY_DATA_DIR=str(tmp_path),
               UPSCALE_PROXY_PORT="0")
    done = subprocess.run([sys.executable, "-m", "proxy", "serve"], env=env, capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 2, done.stderr
    assert "UPSCALE_PROXY_REDIS_URL needs UPSCALE_PROXY_FINGERPRINT_SECRET" in done.stderr
    assert "Traceback" not in done.stderr
