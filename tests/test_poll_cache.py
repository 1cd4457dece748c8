"""Direct-path polls with fewer V3 calls: the PollCache on a fake clock, then through the proxy."""

from __future__ import annotations

import asyncio

import pytest

from proxy.mappings import load
from proxy.v2.poll_cache import PollCache
from proxy.v3.errors import V3StatusError
from proxy.v3.models import TaskResult
from tests.helpers import AUTH, poll_until_done, upscale, v2_call
from tests.images import b64

FP, OTHER_FP = "fp-a", "fp-b"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def v3_result(status: str, *ttls: int) -> TaskResult:
    return TaskResult.model_validate({
        "task": {"task_id": "t1", "status": f"TASK_STATUS_{status}"},
        "images": [{"image_url": f"https://v3.example/{i}.png", "image_url_ttl": ttl} for i, ttl in enumerate(ttls)],
    })


class FakeV3:
    """A stand-in for V3's task-result call: counts calls; `gate`, when set, holds each call until opened."""

    def __init__(self, *replies: TaskResult | Exception) -> None:
        self.replies = list(replies)
        self.calls = 0
        self.started = asyncio.Event()
        self.gate: asyncio.Event | None = None

    async def __call__(self) -> tuple[TaskResult, int]:
        self.calls += 1
        self.started.set()
        if self.gate:
            await self.gate.wait()
        reply = self.replies[min(self.calls, len(self.replies)) - 1]
        if isinstance(reply, Exception):
            raise reply
        return reply, 200


def cache(clock: Clock, *, fresh_for: float = 1.0, max_entries: int = 100) -> PollCache:
    return PollCache(load().task_status, fresh_for=fresh_for, max_entries=max_entries, clock=clock)


async def concurrent_polls(polls: PollCache, v3: FakeV3, n: int, fingerprint: str = FP) -> list:
    v3.gate = asyncio.Event()
    tasks = [asyncio.create_task(polls.result("t1", fingerprint, v3)) for _ in range(n)]
    await v3.started.wait()
    v3.gate.set()
    return await asyncio.gather(*tasks, return_exceptions=True)


# the cache, on a fake clock

async def test__concurrent_polls__share_one_upstream_call():
    v3 = FakeV3(v3_result("PROCESSING"))
    answers = await concurrent_polls(cache(Clock()), v3, 8)
    assert v3.calls == 1
    assert [(status, how) for _, status, how in answers] == [(200, "miss")] + [(None, "shared")] * 7
    assert all(result is answers[0][0] for result, _, _ in answers)


async def test__an_upstream_error__reaches_every_sharing_poll_and_is_not_kept():
    v3 = FakeV3(V3StatusError(429, "RATE_LIMIT_EXCEEDED", "slow down"), v3_result("PROCESSING"))
    polls = cache(Clock())
    answers = await concurrent_polls(polls, v3, 3)
    assert v3.calls == 1
    assert all(isinstance(a, V3StatusError) and a.status == 429 for a in answers)
    assert len(polls) == 0
    _, status, how = await polls.result("t1", FP, v3)
    assert (v3.calls, status, how) == (2, 200, "miss")


async def test__the_first_poller_going_away__does_not_cancel_the_shared_call():
    v3 = FakeV3(v3_result("SUCCEED", 3600))
    polls = cache(Clock())
    v3.gate = asyncio.Event()
    first = asyncio.create_task(polls.result("t1", FP, v3))
    await v3.started.wait()
    second = asyncio.create_task(polls.result("t1", FP, v3))
    await asyncio.sleep(0)  # lets the second poll join the call
    first.cancel()
    v3.gate.set()
    result, status, how = await second
    assert (result.task.status, status, how) == ("TASK_STATUS_SUCCEED", None, "shared")
    assert first.cancelled() and v3.calls == 1
    assert (await polls.result("t1", FP, v3))[2] == "hit"


async def test__a_terminal_result__answers_polls_while_its_shortest_image_url_lives():
    clock, v3 = Clock(), FakeV3(v3_result("SUCCEED", 900, 600))
    polls = cache(clock)
    assert (await polls.result("t1", FP, v3))[1:] == (200, "miss")
    clock.now += 599
    assert (await polls.result("t1", FP, v3))[1:] == (None, "hit")
    clock.now += 1
    assert (await polls.result("t1", FP, v3))[1:] == (200, "miss")
    assert v3.calls == 2


async def test__a_failed_result_without_images__is_kept_an_hour():
    clock, v3 = Clock(), FakeV3(v3_result("FAILED"))
    polls = cache(clock, fresh_for=0)
    await polls.result("t1", FP, v3)
    clock.now += 3599
    assert (await polls.result("t1", FP, v3))[2] == "hit"
    clock.now += 1
    assert (await polls.result("t1", FP, v3))[2] == "miss"


@pytest.mark.parametrize("status", ["QUEUED", "PROCESSING", "UNKNOWN", "SOMETHING_NEW"])
async def test__a_running_result__answers_polls_for_the_fresh_window_only(status):
    clock, v3 = Clock(), FakeV3(v3_result(status))
    polls = cache(clock, fresh_for=1.0)
    await polls.result("t1", FP, v3)
    clock.now += 0.9
    assert (await polls.result("t1", FP, v3))[2] == "hit"
    clock.now += 0.1
    assert (await polls.result("t1", FP, v3))[2] == "miss"
    assert v3.calls == 2


async def test__fresh_window_zero__sends_every_running_poll_upstream_but_keeps_terminal_results():
    v3 = FakeV3(v3_result("PROCESSING"), v3_result("PROCESSING"), v3_result("SUCCEED", 3600))
    polls = cache(Clock(), fresh_for=0)
    assert [(await polls.result("t1", FP, v3))[2] for _ in range(5)] == ["miss", "miss", "miss", "hit", "hit"]
    assert v3.calls == 3


async def test__another_fingerprint__never_reads_or_shares_a_result():
    polls = cache(Clock())
    await polls.result("t1", FP, FakeV3(v3_result("SUCCEED", 3600)))
    stranger = FakeV3(V3StatusError(404, "TASK_NOT_FOUND", "task not found"))
    with pytest.raises(V3StatusError):
        await polls.result("t1", OTHER_FP, stranger)
    assert stranger.calls == 1
    owner, other = FakeV3(v3_result("PROCESSING")), FakeV3(v3_result("PROCESSING"))
    owner.gate = other.gate = asyncio.Event()
    both = [asyncio.create_task(polls.result("t2", fp, v3)) for fp, v3 in ((FP, owner), (OTHER_FP, other))]
    await owner.started.wait()
    await other.started.wait()
    owner.gate.set()
    assert [how for _, _, how in await asyncio.gather(*both)] == ["miss", "miss"]


async def test__past_max_entries__the_least_recently_used_goes_first():
    polls, v3 = cache(Clock(), max_entries=2), FakeV3(v3_result("SUCCEED", 3600))
    for task_id in ("t1", "t2", "t1", "t3"):  # t1 read again: t2 is the least recently used
        await polls.result(task_id, FP, v3)
    assert len(polls) == 2 and v3.calls == 3
    assert (await polls.result("t1", FP, v3))[2] == "hit"
    assert (await polls.result("t2", FP, v3))[2] == "miss"


async def test__an_expired_entry__is_dropped_when_met():
    clock = Clock()
    polls = cache(clock)
    await polls.result("t1", FP, FakeV3(v3_result("PROCESSING")))
    clock.now += 5
    with pytest.raises(V3StatusError):
        await polls.result("t1", FP, FakeV3(V3StatusError(503, "SERVICE_NOT_AVAILABLE", "")))
    assert len(polls) == 0


async def test__max_entries_zero__neither_keeps_nor_shares():
    v3 = FakeV3(v3_result("SUCCEED", 3600))
    polls = cache(Clock(), max_entries=0)
    answers = await concurrent_polls(polls, v3, 4)
    assert v3.calls == 4 and {how for _, _, how in answers} == {"miss"}
    assert (await polls.result("t1", FP, v3))[2] == "miss" and len(polls) == 0


async def test__expected_then_delivered__polls_hear_queued_then_the_result_without_a_v3_call():
    clock, v3 = Clock(), FakeV3(v3_result("SUCCEED", 600))
    polls = cache(clock)
    polls.expect("t1", FP, 1_000, 30)
    queued, status, how = await polls.result("t1", FP, v3)
    assert (queued.task.status, status, how) == ("TASK_STATUS_QUEUED", None, "hit")
    await polls.deliver("t1", FP, v3_result("SUCCEED", 600))
    done, status, how = await polls.result("t1", FP, v3)
    assert (done.task.status, status, how, v3.calls) == ("TASK_STATUS_SUCCEED", None, "hit", 0)
    clock.now += 600
    assert (await polls.result("t1", FP, v3))[1:] == (200, "miss")


async def test__a_webhook_faster_than_the_submission_reply__is_not_hidden_by_expect():
    polls, v3 = cache(Clock()), FakeV3(v3_result("PROCESSING"))
    await polls.deliver("t1", FP, v3_result("SUCCEED", 600))
    polls.expect("t1", FP, 1_000, 30)
    assert (await polls.result("t1", FP, v3))[0].task.status == "TASK_STATUS_SUCCEED" and v3.calls == 0


async def test__a_delivered_running_result_or_another_keys_poll__is_not_an_answer():
    polls, v3 = cache(Clock()), FakeV3(v3_result("PROCESSING"))
    await polls.deliver("t1", FP, v3_result("PROCESSING"))
    await polls.deliver("t2", FP, v3_result("SUCCEED", 600))
    assert (await polls.result("t1", FP, v3))[2] == "miss"
    assert (await polls.result("t2", OTHER_FP, v3))[2] == "miss"
    assert v3.calls == 2


# through the proxy, in front of the emulator

OTHER_KEY = "sk-test-other-fedcba9876543210"
PNG = {"image": b64(16, 16), "upscaling_resize": 2}


def result_calls(emulator) -> int:
    return emulator.requests["result"]


async def poll(client, task_id: str, headers: dict = AUTH) -> dict:
    return await v2_call(client, "GET", f"/v2/progress?task_id={task_id}", headers=headers)


async def test__concurrent_polls_of_a_running_task__make_one_v3_call(start_emulator, start_proxy, log_lines):
    server, emu = await start_emulator(queue_delay=0, process_delay=60, latency=0.2)
    client = await start_proxy(str(server.make_url("")))
    task_id = (await upscale(client, PNG))["data"]["task_id"]
    replies = await asyncio.gather(*(poll(client, task_id) for _ in range(8)))
    assert result_calls(emu) == 1
    assert {(r["code"], r["data"]["status"]) for r in replies} == {(0, 1)}
    outcomes = sorted(line["poll_cache"] for line in log_lines.requests() if line["path"] == "/v2/progress")
    assert outcomes[0] == "miss" and set(outcomes[1:]) <= {"hit", "shared"} and len(outcomes) == 8
    async with client.get("/metrics") as resp:
        assert 'upscale_proxy_poll_cache_total{outcome="miss"} 1.0' in await resp.text()


async def test__polls_after_a_terminal_answer__make_no_v3_call(start_emulator, start_proxy):
    server, emu = await start_emulator()
    client = await start_proxy(str(server.make_url("")), poll_cache_seconds=0)
    task_id = (await upscale(client, PNG))["data"]["task_id"]
    done = await poll_until_done(client, task_id)
    calls = result_calls(emu)
    for _ in range(5):
        assert (await poll(client, task_id))["data"] == done
    assert result_calls(emu) == calls


async def test__another_key__goes_upstream_and_hears_no_such_task(start_emulator, start_proxy):
    server, emu = await start_emulator(api_keys=[AUTH["Authorization"].split()[1], OTHER_KEY])
    client = await start_proxy(str(server.make_url("")), poll_cache_seconds=0)
    task_id = (await upscale(client, PNG))["data"]["task_id"]
    await poll_until_done(client, task_id)
    calls = result_calls(emu)
    reply = await poll(client, task_id, headers={"Authorization": f"Bearer {OTHER_KEY}"})
    assert reply["code"] == 3 and (reply["data"]["status"], reply["data"]["imgs"]) == (3, None)
    assert result_calls(emu) == calls + 1
    assert (await poll(client, task_id))["data"]["status"] == 2  # the owner's kept result is untouched
    assert result_calls(emu) == calls + 1


async def test__fresh_window_zero__every_poll_of_a_running_task_goes_upstream(start_emulator, start_proxy):
    server, emu = await start_emulator(queue_delay=0, process_delay=60)
    client = await start_proxy(str(server.make_url("")), poll_cache_seconds=0)
    task_id = (await upscale(client, PNG))["data"]["task_id"]
    for _ in range(4):
        assert (await poll(client, task_id))["data"]["status"] == 1
    assert result_calls(emu) == 4


async def test__an_upstream_error__is_not_kept(start_emulator, start_proxy):
    server, emu = await start_emulator(queue_delay=0, process_delay=0, error_reason="RATE_LIMIT_EXCEEDED",
                                       error_limit=1, error_endpoints=["result"])
    client = await start_proxy(str(server.make_url("")), upstream_retries=0)
    task_id = (await upscale(client, PNG))["data"]["task_id"]
    limited = await poll(client, task_id)  # ridden through: the task is still running, as far as is known
    assert (limited["code"], limited["data"]["status"]) == (0, 1)
    reply = await poll(client, task_id)
    assert (reply["code"], reply["data"]["status"]) == (0, 2)
    assert result_calls(emu) == 2
