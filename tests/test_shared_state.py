"""State replicas agree on, live, when they share a Redis (issue 10): webhook tokens any replica
accepts, results delivered to one replica's webhook that another replica's polls and task steps
read, and terminal direct results fetched by one that the others don't fetch again. Real Redis
(one redis-server per module), real proxies and the emulator on loopback."""

from __future__ import annotations

import asyncio
import base64
import uuid

import pytest

from proxy.app import create_app
from proxy.keys import WEBHOOKS
from proxy.mappings import load
from proxy.settings import Settings
from proxy.stores.redis import RedisSharedResults, connect
from proxy.v2.poll_cache import PollCache
from proxy.v3.models import TaskResult
from tests.helpers import AUTH, free_port, poll_until_done, upscale, v2_call
from tests.images import encode, pattern
from tests.redis_server import RedisServer, redis_server_binary

SECRET = "one secret for every replica"
DIRECT = {"upscaler_1": "4x-UltraSharp", "upscaling_resize": 2}
TWO_PASSES = {"upscaler_1": "4x-UltraSharp", "upscaling_resize": 6}  # composed: 4x, 4x on its image, resize


def image(w: int = 16, h: int = 12) -> str:
    return base64.b64encode(encode(pattern(w, h))).decode()


def prefix() -> str:
    return f"test-{uuid.uuid4().hex}:"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def v3_result(task_id: str, status: str, ttl: int = 600) -> TaskResult:
    return TaskResult.model_validate({
        "task": {"task_id": task_id, "status": f"TASK_STATUS_{status}"},
        "images": [{"image_url": f"https://v3.example/{task_id}.png", "image_url_ttl": ttl}],
    })


class NoV3:
    """A task-result call that must not happen."""

    calls = 0

    async def __call__(self):
        self.calls += 1
        raise AssertionError("V3 was asked")


@pytest.fixture
async def shared(redis_server):
    """A shared tier on the module's Redis, under a prefix of this test's own; `make()` gives
    another one on the same keys (another replica's)."""
    clients = []
    space = prefix()

    def make(**kw) -> RedisSharedResults:
        clients.append(connect(redis_server.url, timeout=2))
        return RedisSharedResults(clients[-1], space, **kw)

    yield make
    for client in clients:
        await client.aclose()


# --- the shared tier and the poll cache on it -------------------------------------------------------

async def test__shared_results__put_get_pop_and_expire(shared):
    tier = shared()
    assert await tier.put("a", b"one", 0.2) and await tier.put("b", b"two", 60)
    value, left = await tier.get_with_ttl("b")
    assert value == b"two" and 59 < left <= 60
    assert await tier.pop("b") == b"two" and await tier.get("b") is None and await tier.pop("b") is None
    await asyncio.sleep(0.3)
    assert await tier.get("a") is None


async def test__a_result_delivered_to_one_replica__answers_the_other_replicas_expected_poll(shared):
    table = load().task_status
    first = PollCache(table, fresh_for=1, max_entries=100, shared=shared(), clock=Clock())
    second = PollCache(table, fresh_for=1, max_entries=100, shared=shared(), clock=Clock())
    first.expect("t1", "fp", 1_000, 30)
    queued, _, _ = await first.result("t1", "fp", NoV3())
    assert queued.task.status == "TASK_STATUS_QUEUED"  # nothing delivered yet: the local stand-in
    await second.deliver("t1", "fp", v3_result("t1", "SUCCEED"))
    v3 = NoV3()
    result, status, how = await first.result("t1", "fp", v3)
    assert (result.task.status, status, how, v3.calls) == ("TASK_STATUS_SUCCEED", None, "hit", 0)
    assert result.images[0].image_url == "https://v3.example/t1.png"
    with pytest.raises(AssertionError, match="V3 was asked"):  # another key's poll never reads it
        await first.result("t1", "another fp", NoV3())


async def test__a_terminal_result_fetched_by_one_replica__is_not_fetched_again_by_another(shared):
    table = load().task_status
    first = PollCache(table, fresh_for=0, max_entries=100, shared=shared(), clock=Clock())
    second_clock = Clock()
    second = PollCache(table, fresh_for=0, max_entries=100, shared=shared(), clock=second_clock)

    async def running():
        return v3_result("t2", "PROCESSING"), 200

    async def done():
        return v3_result("t2", "SUCCEED", ttl=2), 200

    await first.result("t2", "fp", running)  # running results stay local
    assert (await second.result("t2", "fp", running))[2] == "miss"
    await first.result("t2", "fp", done)
    await asyncio.sleep(0.5)
    result, status, how = await second.result("t2", "fp", NoV3())
    assert (result.task.status, status, how) == ("TASK_STATUS_SUCCEED", None, "hit")
    await shared().pop("poll:t2:fp")  # from now on, only what the second replica kept answers
    second_clock.now += 1.3
    assert (await second.result("t2", "fp", NoV3()))[2] == "hit"
    second_clock.now += 0.3  # kept for what was left of the image URLs' life (1.5 s), not 2 s more
    with pytest.raises(AssertionError, match="V3 was asked"):
        await second.result("t2", "fp", NoV3())


# --- replicas over HTTP, the emulator calling the webhook --------------------------------------------

async def replicas(aiohttp_client, tmp_path, redis_url: str, upstream: str, **overrides):
    """Two proxies on one Redis with webhooks on; the first tells V3 to call the second back."""
    space, second_port, first_port = prefix(), free_port(), free_port()

    async def start(port: int, public_url: str, data_dir: str):
        settings = Settings(upstream=upstream, data_dir=tmp_path / data_dir, webhooks=True, public_url=public_url,
                            redis_url=redis_url, redis_prefix=space, fingerprint_secret=SECRET,
                            poll_cache_seconds=0, **overrides)
        return await aiohttp_client(create_app(settings), server_kwargs={"port": port})

    second = await start(second_port, f"http://127.0.0.1:{second_port}", "b")
    first = await start(first_port, f"http://127.0.0.1:{second_port}", "a")
    return first, second, f"http://127.0.0.1:{second_port}/_proxy/webhooks/v3/"


async def test__a_direct_task_whose_webhook_reaches_another_replica__is_answered_without_v3(
        redis_server, start_emulator, aiohttp_client, tmp_path):
    server, emu = await start_emulator(queue_delay=0.02, process_delay=0.02)
    first, second, webhook = await replicas(aiohttp_client, tmp_path, redis_server.url, str(server.make_url("")))
    reply = await upscale(first, {"image": image(), **DIRECT})
    task_id = reply["data"]["task_id"]
    data = await poll_until_done(first, task_id)
    assert data["status"] == 2 and data["imgs"]
    assert [(url.startswith(webhook), outcome) for url, outcome in emu.webhook_calls] == [(True, 204)]
    assert emu.requests["result"] == 0
    on_second = await v2_call(second, "GET", f"/v2/progress?task_id={task_id}")
    assert on_second["data"] == data and emu.requests["result"] == 0


async def test__a_composed_task_whose_webhooks_reach_another_replica__moves_on_at_once_without_task_result(
        redis_server, start_emulator, aiohttp_client, tmp_path):
    server, emu = await start_emulator(queue_delay=0.02, process_delay=0.02)
    # the first replica holds the task; the second puts each job's result in Redis and makes the
    # task due in the task store, so the first moves it on at its next look, not at the fallback
    first, _, webhook = await replicas(aiohttp_client, tmp_path, redis_server.url, str(server.make_url("")),
                                       webhook_fallback=60)
    reply = await upscale(first, {"image": image(5, 3), **TWO_PASSES})
    data = await poll_until_done(first, reply["data"]["task_id"])  # gives up after ~10 s: two fallbacks are 120 s
    assert data["status"] == 2, data
    assert [(url.startswith(webhook), outcome) for url, outcome in emu.webhook_calls] == [(True, 204)] * 2
    assert (emu.requests["result"], emu.requests["submit"]) == (0, 2)


async def test__webhook_tokens__any_replica_on_redis_accepts_them_and_without_redis_only_their_own(
        redis_server, start_emulator, aiohttp_client, tmp_path):
    server, _ = await start_emulator()
    first, second, _ = await replicas(aiohttp_client, tmp_path, redis_server.url, str(server.make_url("")))
    token = first.server.app[WEBHOOKS].issue("fp", "a-task").rsplit("/", 1)[1]
    assert second.server.app[WEBHOOKS].owner(token).composed_task == "a-task"
    # without Redis a delivery stays in the process it reached: a token is for its own process only
    # (two `--workers` processes on one data directory and one fingerprint secret)
    alone = [await aiohttp_client(create_app(Settings(
        upstream=str(server.make_url("")), data_dir=tmp_path / "shared", webhooks=True,
        public_url="http://127.0.0.1:1", fingerprint_secret=SECRET))) for _ in range(2)]
    token = alone[0].server.app[WEBHOOKS].issue("fp").rsplit("/", 1)[1]
    assert alone[0].server.app[WEBHOOKS].owner(token) is not None
    assert alone[1].server.app[WEBHOOKS].owner(token) is None


# --- Redis down -----------------------------------------------------------------------------------

async def test__redis_stopped__a_direct_poll_still_works_through_v3(start_emulator, start_proxy, tmp_path,
                                                                    log_lines):
    redis = RedisServer(redis_server_binary(), tmp_path / "redis")
    redis.start()
    try:
        server, emu = await start_emulator(queue_delay=0.05, process_delay=0.1)
        client = await start_proxy(str(server.make_url("")), redis_url=redis.url, redis_prefix=prefix(),
                                   fingerprint_secret=SECRET)
        task_id = (await upscale(client, {"image": image(), **DIRECT}))["data"]["task_id"]
        redis.stop()
        data = await poll_until_done(client, task_id)
        assert data["status"] == 2 and emu.requests["result"] >= 1
        calls = emu.requests["result"]
        again = await v2_call(client, "GET", f"/v2/progress?task_id={task_id}", headers=AUTH)
        assert again["data"] == data and emu.requests["result"] == calls  # kept here all the same
    finally:
        redis.stop()
    warnings = [line for line in log_lines if line["event"].startswith("Redis is unavailable for shared results")]
    assert [line["level"] for line in warnings][:1] == ["warning"]
    assert all(line["level"] == "debug" for line in warnings[1:])
