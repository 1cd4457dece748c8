"""The proxy holds under upstream faults: a matrix of faults, each through a real proxy on loopback
in front of the V3 emulator (its fault injection) behind tests/fake_upstream.py (the faults the
emulator can't make). Each fault gets its V2 answer, and the tasks accepted before it are answered
correctly once it has passed. Then the circuit breaker: through the proxy, and on its own clock."""

from __future__ import annotations

import asyncio
import base64
import struct
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from novita_client import NovitaClient, UpscaleRequest
from novita_client.proto import UpscaleResizeMode
from yarl import URL

from proxy.compose.task import is_composed_id
from proxy.emulator.app import Emulator
from proxy.v2.last_known import LastKnown
from proxy.v3.breaker import BreakerState, CircuitBreaker
from proxy.v3.errors import V3Unreachable
from tests.fake_upstream import FakeUpstream, Fault
from tests.helpers import free_port, poll_until_done, upscale, v2_call
from tests.images import decode, encode, pattern
from tests.redis_server import RedisServer, redis_server_binary

MiB = 1024 * 1024
# a direct task (one V3 job is the answer) and a composed one (a V3 job, then a local crop)
DIRECT = {"upscaler_1": "R-ESRGAN 4x+ Anime6B", "resize_mode": 0, "upscaling_resize": 2}
COMPOSED = {"upscaler_1": "4x-UltraSharp", "resize_mode": 1, "upscaling_resize_w": 30,
            "upscaling_resize_h": 20, "upscaling_crop": True}


def body(fields: dict) -> dict:
    return {"image": base64.b64encode(encode(pattern(12, 9))).decode(), **fields}


async def poll(client: TestClient, task_id: str) -> dict:
    return await v2_call(client, "GET", f"/v2/progress?task_id={task_id}")


@dataclass
class Env:
    """A proxy in front of a FakeUpstream relaying to an emulator, all on loopback."""

    client: TestClient
    fake: FakeUpstream
    emu: Emulator

    async def accept_tasks(self) -> tuple[str, str]:
        """Submit a direct and a composed task. -> (their V2 task ids)"""
        ids = []
        for fields in (DIRECT, COMPOSED):
            reply = await upscale(self.client, body(fields))
            assert reply["code"] == 0, reply
            ids.append(reply["data"]["task_id"])
        assert not is_composed_id(ids[0]) and is_composed_id(ids[1])
        return ids[0], ids[1]

    async def finish(self, task_ids: tuple[str, ...]) -> None:
        """Each task ends with its image, which downloads."""
        await asyncio.gather(*(self._finish(task_id) for task_id in task_ids))

    async def _finish(self, task_id: str) -> None:
        data = await poll_until_done(self.client, task_id)
        assert data["status"] == 2 and data["failed_reason"] == "", data
        async with self.client.session.get(data["imgs"][0]) as resp:
            assert resp.status == 200 and resp.content_type == "image/png"


@pytest.fixture
async def make_fake() -> AsyncIterator[Callable[[str], Awaitable[FakeUpstream]]]:
    fakes: list[FakeUpstream] = []

    async def make(target: str) -> FakeUpstream:
        fakes.append(await FakeUpstream(target).start())
        return fakes[-1]

    yield make
    for fake in fakes:
        await fake.close()


@pytest.fixture
def start_env(start_emulator, start_proxy, make_fake) -> Callable[..., Awaitable[Env]]:
    async def start(image_hosts: tuple[str, ...] = (), **settings) -> Env:
        server, emu = await start_emulator(queue_delay=0.1, process_delay=0.2)
        fake = await make_fake(str(server.make_url("")))
        # V3's image URLs are the emulator's, behind the fake: another port of the upstream's host
        hosts = [f"127.0.0.1:{server.port}", *image_hosts]
        client = await start_proxy(fake.url, **{"upstream_retries": 2, "upstream_timeout": 5,
                                                "image_hosts": hosts, **settings})
        return Env(client, fake, emu)

    return start


# --- the fault matrix: V3-facing faults ---------------------------------------------------------

Step = Callable[[Env], Awaitable[None] | None]


def emulate(**faults) -> Step:
    """Set emulator fault injection (and count injections from now)."""

    def step(env: Env) -> None:
        env.emu.injected = 0
        for name, value in faults.items():
            setattr(env.emu.settings, name, value)

    return step


def upstream_fault(fault: Fault) -> Step:
    """Set a fault of the fake upstream."""

    def step(env: Env) -> None:
        env.fake.fault = fault

    return step


def healthy(env: Env) -> None:
    emulate(latency=0, error_reason=None, error_limit=None, error_endpoints=["submit", "result"])(env)
    env.fake.fault = Fault.NONE


async def port_closed(env: Env) -> None:
    await env.fake.down()


async def port_open(env: Env) -> None:
    await env.fake.up()
    healthy(env)


@dataclass(frozen=True)
class Case:
    fault: Step
    submit: tuple[int, str]  # (code, words in msg) of an upscale during the fault
    posts: int  # how many times that upscale reached the upstream: never more than once
    heal: Step = healthy
    settings: dict = field(default_factory=dict)
    poll_calls: int = 1  # at least this many calls reached the upstream for the poll (the engine's count too)
    rides_through: bool = True  # the poll can't learn the task's state: it answers the last known one


CONNECT = (5, "upstream unreachable: could not connect to V3")
BROKE = (5, "upstream unreachable: the connection to V3 broke before its reply was read")
SLOW = (9, "upstream did not answer in time")
RATE_LIMITED = (5, "(V3 rate limit reached (HTTP 429); V2 has no code for it, retry later)")
UNAVAILABLE_503 = (5, "upstream error: SERVICE_NOT_AVAILABLE")
GATEWAY_504 = (9, "upstream error: HTTP 504")
UNREADABLE = (-1, "upstream sent a reply the proxy cannot read")
CASES = {
    "upstream down (port closed)": Case(port_closed, heal=port_open, submit=CONNECT, posts=0, poll_calls=0),
    "upstream hangs past the timeout": Case(emulate(latency=1.0), submit=SLOW, posts=1,
                                            settings={"upstream_timeout": 0.3}),
    "5xx burst on polls (a GET recovers)": Case(
        emulate(error_reason="SERVICE_NOT_AVAILABLE", error_limit=2, error_endpoints=["result"]),
        submit=(0, ""), posts=1, poll_calls=3, rides_through=False),
    "5xx burst on submissions (a POST is not re-sent)": Case(
        emulate(error_reason="SERVICE_NOT_AVAILABLE", error_limit=1, error_endpoints=["submit"]),
        submit=UNAVAILABLE_503, posts=1, rides_through=False),
    "rate limited (429)": Case(emulate(error_reason="RATE_LIMIT_EXCEEDED"), submit=RATE_LIMITED, posts=1),
    "a gateway's HTML error page (504)": Case(emulate(error_reason="GATEWAY_TIMEOUT"), submit=GATEWAY_504, posts=1),
    "malformed JSON in a 200": Case(upstream_fault(Fault.MALFORMED_JSON), submit=UNREADABLE, posts=1),
    "connection reset mid-reply": Case(upstream_fault(Fault.RESET_MID_REPLY), submit=BROKE, posts=1),
    "connections reset as they open": Case(upstream_fault(Fault.RESET), submit=BROKE, posts=0, poll_calls=0),
}


async def ride_throughs(client: TestClient) -> dict[str, float]:
    """upscale_proxy_poll_ride_through_total by answer."""
    async with client.get("/metrics") as resp:
        lines = (await resp.text()).splitlines()
    prefix = "upscale_proxy_poll_ride_through_total{answer=\""
    return {line[len(prefix):].split('"')[0]: float(line.split()[-1]) for line in lines if line.startswith(prefix)}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test__fault__polls_ride_through_it_submissions_get_its_v2_answer_and_tasks_finish_after_it(
        start_env, case: Case):
    # the breaker is off here, so that each fault's own answer shows (the breaker's tests are below)
    env = await start_env(breaker_failures=0, **case.settings)
    direct, composed = await env.accept_tasks()
    known = {task_id: await poll(env.client, task_id) for task_id in (direct, composed)}  # V3 healthy
    fake, before = env.fake, env.fake.calls.copy()

    await maybe(case.fault(env))
    during = await poll(env.client, direct)  # first: a transient fault must meet this call
    assert (during["code"], during["msg"]) == (0, ""), during
    if case.rides_through:  # exactly what the last poll said: nothing alarming, nothing made up
        assert during["data"] == known[direct]["data"], (during, known[direct])
        assert (await ride_throughs(env.client)).get("last_known") == 1
    else:
        assert during["data"]["status"] in (0, 1, 2), during
    assert fake.calls["result"] - before["result"] >= case.poll_calls
    composed_during = await poll(env.client, composed)  # answered from the store, as always
    assert composed_during["code"] == 0 and composed_during["data"]["status"] in (0, 1, 2), composed_during
    posts = fake.calls["submit"]
    reply = await upscale(env.client, body(DIRECT))
    assert (reply["code"], case.submit[1] in reply["msg"]) == (case.submit[0], True), reply
    assert fake.calls["submit"] - posts == case.posts
    for answer in (during, reply):  # no address, no aiohttp wording
        assert str(fake.port) not in answer["msg"] and "Client" not in answer["msg"]

    await maybe(case.heal(env))
    await env.finish((direct, composed, *await env.accept_tasks()))


async def test__outage__a_task_never_polled_here_is_running_and_past_the_grace_it_fails_with_the_reason(
        start_env):
    env = await start_env(breaker_failures=0, upstream_retries=0, poll_outage_grace=0.3)
    direct, _ = await env.accept_tasks()
    await env.fake.down()
    first = await poll(env.client, direct)
    assert first["code"] == 0 and (first["data"]["status"], first["data"]["progress"]) == (1, 0), first
    await asyncio.sleep(0.35)
    given_up = await poll(env.client, direct)
    assert given_up["code"] == 0 and given_up["data"]["status"] == 3, given_up
    reason = given_up["data"]["failed_reason"]
    assert "could not be reached for" in reason and "could not connect to V3" in reason, reason
    assert str(env.fake.port) not in reason
    assert await ride_throughs(env.client) == {"unseen": 1, "past_grace": 1}

    await env.fake.up()  # V3 back: the task's real state again
    await env.finish((direct,))


async def test__outage__a_final_answer_stands_through_it(start_env):
    # no poll cache: every poll asks V3, so the answer during the outage is the last known one's
    env = await start_env(breaker_failures=0, upstream_retries=0, poll_outage_grace=0.1, poll_cache_max_entries=0)
    direct, _ = await env.accept_tasks()
    done = await poll_until_done(env.client, direct)
    await env.fake.down()
    await asyncio.sleep(0.15)  # past the grace: a task that was answered final is not failed by it
    reply = await poll(env.client, direct)
    assert reply == {"code": 0, "msg": "", "data": done}
    assert await ride_throughs(env.client) == {"last_known": 1}


async def maybe(result: Awaitable[None] | None) -> None:
    if result is not None:
        await result


# --- the fault matrix: composed tasks and the image URLs V3 gives -------------------------------

def bomb_png() -> bytes:
    """A PNG header claiming 30000 x 30000 pixels, and no pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 1, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture
async def bad_images(aiohttp_server) -> str:
    """An image host on loopback, each path prefix a fault."""
    async def missing(request: web.Request) -> web.Response:
        return web.Response(status=404, text="no such image")

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query.get("to", "/"))

    async def huge(request: web.Request) -> web.Response:
        return web.Response(body=b"\0" * (MiB + 1), content_type="image/png")

    async def huge_unannounced(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})  # chunked: no Content-Length
        await resp.prepare(request)
        for _ in range(5):
            await resp.write(b"\0" * (MiB // 4))
        return resp

    async def bomb(request: web.Request) -> web.Response:
        return web.Response(body=bomb_png(), content_type="image/png")

    app = web.Application()
    for prefix, handler in [("missing", missing), ("moved", moved), ("huge", huge),
                            ("huge-unannounced", huge_unannounced), ("bomb", bomb)]:
        app.router.add_get(f"/{prefix}/{{tail:.*}}", handler)
    return str((await aiohttp_server(app)).make_url("")).rstrip("/")


IMAGE_CASES = {  # where V3's image URLs point -> words of the composed task's failed_reason
    "404": ("{images}/missing", "image fetch answered HTTP 404"),
    "a redirect (to the real image)": ("{images}/moved", "image fetch answered HTTP 302"),
    "another host": ("http://localhost:{upstream_port}", "image host 'localhost' is not allowed"),
    "another port of an allowed host": ("http://127.0.0.1:{other_port}", "is not an allowed origin"),
    "an allowed origin, down": ("{allowed_but_closed}", "image fetch failed: no connection"),
    "over the fetch cap": ("{images}/huge", f"image is over {MiB} bytes"),
    "over the fetch cap, no Content-Length": ("{images}/huge-unannounced", f"image is over {MiB} bytes"),
    "a decompression bomb's header": ("{images}/bomb", "pixels"),
}


@pytest.mark.parametrize(("where", "reason"), IMAGE_CASES.values(), ids=IMAGE_CASES.keys())
async def test__bad_image_url__ends_the_composed_task_with_status_3_and_a_reason(start_env, bad_images,
                                                                                  where, reason):
    closed = free_port()
    env = await start_env(image_max_mb=1, image_hosts=(URL(bad_images).raw_authority, f"127.0.0.1:{closed}"))
    direct, composed = await env.accept_tasks()

    env.fake.point_images_at(where.format(images=bad_images, upstream_port=env.fake.port, other_port=free_port(),
                                          allowed_but_closed=f"http://127.0.0.1:{closed}"))
    reply = await upscale(env.client, body(COMPOSED))
    task_id = reply["data"]["task_id"]
    data = await poll_until_done(env.client, task_id)
    assert (data["status"], data["imgs"]) == (3, None) and reason in data["failed_reason"], data
    assert "127.0.0.1" not in data["failed_reason"] and "Client" not in data["failed_reason"]
    assert (await poll(env.client, task_id))["data"]["failed_reason"] == data["failed_reason"]  # it stays

    env.fake.point_images_at(None)
    await env.finish((direct, composed, *await env.accept_tasks()))


# --- the circuit breaker, through the proxy -----------------------------------------------------

UNAVAILABLE = "upstream unreachable: V3 is unavailable, retry in"


async def breaker_gauge(client: TestClient) -> float:
    async with client.get("/metrics") as resp:
        line = next(x for x in (await resp.text()).splitlines() if x.startswith("upscale_proxy_v3_breaker_state "))
    return float(line.split()[1])


async def test__breaker__opens_after_n_failures_then_submissions_get_code_5_without_connecting(start_env):
    env = await start_env(upstream_retries=0, breaker_failures=3, breaker_cooldown=0.3)
    fake = env.fake
    fake.fault = Fault.RESET  # it counts the connections it accepts, and resets each
    fake.drop_connections()  # none kept alive from before: each call must connect
    await asyncio.sleep(0.05)
    accepts = fake.accepts

    for _ in range(3):  # upscales: aiohttp itself tries a GET twice on a reset, never a POST
        reply = await upscale(env.client, body(DIRECT))
        assert reply["code"] == 5 and "broke" in reply["msg"], reply
    assert fake.accepts - accepts == 3
    assert await breaker_gauge(env.client) == BreakerState.OPEN

    for _ in range(3):
        reply = await upscale(env.client, body(DIRECT))
        assert reply["code"] == 5 and UNAVAILABLE in reply["msg"], reply
    assert fake.accepts - accepts == 3  # failed fast: no connection tried

    await asyncio.sleep(0.35)  # the cool-down; V3 is still down: the probe fails, it opens again
    reply = await upscale(env.client, body(DIRECT))
    assert reply["code"] == 5 and "broke" in reply["msg"]
    assert fake.accepts - accepts == 4
    assert await breaker_gauge(env.client) == BreakerState.OPEN


async def test__breaker__open__polls_still_try_v3_ride_through_and_the_first_answer_closes_it(start_env):
    # a cool-down far longer than the test: only a poll's answer can close the breaker here
    env = await start_env(upstream_retries=0, breaker_failures=2, breaker_cooldown=600)
    reply = await upscale(env.client, body(DIRECT))
    direct, fake = reply["data"]["task_id"], env.fake
    known = await poll(env.client, direct)
    fake.fault = Fault.RESET
    fake.drop_connections()
    await asyncio.sleep(0.05)
    for _ in range(2):
        assert (await upscale(env.client, body(DIRECT)))["code"] == 5
    assert await breaker_gauge(env.client) == BreakerState.OPEN

    accepts = fake.accepts
    for _ in range(3):  # while open, a poll still goes, and answers what was last known
        assert await poll(env.client, direct) == known
    assert fake.accepts - accepts >= 3

    fake.fault = Fault.NONE  # V3 is back: the next poll hears it, and so do submissions, at once
    assert (await poll(env.client, direct))["code"] == 0
    assert await breaker_gauge(env.client) == BreakerState.CLOSED
    assert (await upscale(env.client, body(DIRECT)))["code"] == 0
    await env.finish((direct,))


async def test__breaker__on_a_closed_port__polls_ride_through_and_composed_tasks_wait_it_out(start_env, log_lines):
    env = await start_env(upstream_retries=0, breaker_failures=2, breaker_cooldown=0.2)
    direct, composed = await env.accept_tasks()
    await env.fake.down()
    for task_id in (direct, composed, direct, direct):  # a composed task answers from its store
        reply = await poll(env.client, task_id)
        assert reply["code"] == 0 and reply["data"]["status"] in (0, 1), reply
    assert (await upscale(env.client, body(DIRECT)))["msg"].startswith(UNAVAILABLE)
    await asyncio.sleep(0.3)  # the engine meets the open breaker (and may probe), and waits
    await env.fake.up()
    await env.finish((direct, composed))
    waits = [line["why"] for line in log_lines if line["event"] == "task waits for V3"]
    assert any("V3 is unavailable" in why for why in waits), waits


@pytest.mark.parametrize(("reason", "code"), [("RATE_LIMIT_EXCEEDED", 0), ("INVALID_API_KEY", 4),
                                              ("TASK_NOT_FOUND", 3)])
async def test__breaker__answers_from_v3_never_open_it(start_env, reason, code):
    env = await start_env(upstream_retries=0, breaker_failures=2)
    emulate(error_reason=reason, error_endpoints=["result"])(env)
    for _ in range(5):
        reply = await poll(env.client, str(uuid.uuid4()))
        assert reply["code"] == code, reply
        if code:  # a refusal: final, with V3's words; a rate limit is ridden through
            assert reason in reply["msg"] and reply["data"]["failed_reason"] == reply["msg"], reply
            assert reply["data"]["status"] == 3
        else:
            assert reply["data"]["status"] == 1
    assert await breaker_gauge(env.client) == BreakerState.CLOSED


async def test__breaker__poll_timeouts_open_it_and_are_ridden_through(start_env):
    env = await start_env(upstream_retries=0, upstream_timeout=0.2, breaker_failures=2, breaker_cooldown=5)
    emulate(latency=1.0)(env)
    answers = [(await poll(env.client, str(uuid.uuid4())))["code"] for _ in range(3)]
    assert answers == [0, 0, 0]
    assert await breaker_gauge(env.client) == BreakerState.OPEN
    assert (await upscale(env.client, body(DIRECT)))["msg"].startswith(UNAVAILABLE)


# --- the circuit breaker, on its own clock ------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        breaker.record(breaker.admit(), down=True)


def test__breaker__opens_after_n_failures_in_a_row_and_refuses_naming_the_wait():
    clock = Clock()
    breaker = CircuitBreaker(failures=3, cooldown=10, window=30, clock=clock)
    fail(breaker, 2)
    assert breaker.state == BreakerState.CLOSED
    fail(breaker)
    assert breaker.state == BreakerState.OPEN
    clock.now += 2.5
    with pytest.raises(V3Unreachable) as e:
        breaker.admit()
    assert e.value.sent is False
    assert str(e.value) == "V3 is unavailable, retry in 8 s (calls to it are paused after 3 failures in a row)"


def test__breaker__an_answer_between_failures_resets_the_count():
    breaker = CircuitBreaker(failures=3, clock=Clock())
    fail(breaker, 2)
    breaker.record(breaker.admit(), down=False)
    fail(breaker, 2)
    assert breaker.state == BreakerState.CLOSED


def test__breaker__failures_spread_over_more_than_the_window_do_not_open_it():
    clock = Clock()
    breaker = CircuitBreaker(failures=3, window=30, clock=clock)
    for _ in range(5):
        fail(breaker)
        clock.now += 20
    assert breaker.state == BreakerState.CLOSED


def test__breaker__after_the_cool_down__one_probe_goes_and_its_answer_closes_it():
    clock = Clock()
    breaker = CircuitBreaker(failures=1, cooldown=10, clock=clock)
    fail(breaker)
    clock.now += 10
    assert breaker.state == BreakerState.HALF_OPEN
    probe = breaker.admit()
    with pytest.raises(V3Unreachable):  # only one probe at a time
        breaker.admit()
    breaker.record(probe, down=False)
    assert breaker.state == BreakerState.CLOSED
    breaker.admit()


def test__breaker__a_failed_probe_opens_it_for_another_cool_down():
    clock = Clock()
    breaker = CircuitBreaker(failures=1, cooldown=10, clock=clock)
    fail(breaker)
    clock.now += 10
    fail(breaker)
    assert breaker.state == BreakerState.OPEN
    clock.now += 9
    with pytest.raises(V3Unreachable):
        breaker.admit()
    clock.now += 1
    assert breaker.state == BreakerState.HALF_OPEN


def test__breaker__an_abandoned_probe_lets_the_next_call_probe():
    clock = Clock()
    breaker = CircuitBreaker(failures=1, cooldown=10, clock=clock)
    fail(breaker)
    clock.now += 10
    breaker.abandon(breaker.admit())  # e.g. the caller was cancelled
    breaker.record(breaker.admit(), down=False)
    assert breaker.state == BreakerState.CLOSED


def test__breaker__calls_let_through_before_it_opened_do_not_count():
    clock = Clock()
    breaker = CircuitBreaker(failures=2, cooldown=10, clock=clock)
    early, late = breaker.admit(), breaker.admit()
    fail(breaker, 2)
    breaker.record(early, down=False)  # a slow call, answered after the breaker opened: not a probe
    assert breaker.state == BreakerState.OPEN
    clock.now += 10
    breaker.record(breaker.admit(), down=False)
    breaker.record(late, down=True)  # and a failure from before the last opening: not counted
    fail(breaker)
    assert breaker.state == BreakerState.CLOSED


def test__breaker__with_zero_failures__never_opens():
    breaker = CircuitBreaker(failures=0, clock=Clock())
    fail(breaker, 100)
    assert breaker.state == BreakerState.CLOSED


async def test__a_later_pass_whose_submission_may_have_reached_v3__is_not_sent_twice(start_env):
    """The reply to the second pass's POST breaks after V3 read it: the job may exist (and be
    charged), so the task ends saying so rather than submitting it again."""
    env = await start_env()
    reply = await upscale(env.client, body({"upscaler_1": "4x-UltraSharp", "upscaling_resize": 6}))
    env.fake.fault, env.fake.fault_on = Fault.RESET_MID_REPLY, frozenset({"submit"})
    data = await poll_until_done(env.client, reply["data"]["task_id"])
    assert data["status"] == 3 and "not sent again" in data["failed_reason"]
    assert env.fake.calls["submit"] == 2  # the first pass, and the second once


# --- a legacy SDK's own wait loop, and the task store, through outages ------------------------------

async def test__legacy_sdk_wait_for_task__rides_through_a_v3_outage_and_gets_its_images(start_env):
    """novita-client 0.4.12 (requests, in threads): its `wait_for_task` reads `data.status` of every
    poll and died on the first `data: null`. V3 goes down long enough for the breaker to open, and
    comes back: both tasks finish, and their images download."""
    env = await start_env(upstream_retries=0, breaker_failures=2, breaker_cooldown=600)
    sdk = NovitaClient("sk-legacy-sdk-test", base_url=str(env.client.make_url("")).rstrip("/"))
    image = base64.b64encode(encode(pattern(12, 9))).decode()
    requests = [UpscaleRequest(image=image, upscaler_1="R-ESRGAN 4x+ Anime6B", upscaling_resize=2),
                UpscaleRequest(image=image, upscaler_1="4x-UltraSharp", resize_mode=UpscaleResizeMode.SIZE,
                               upscaling_resize_w=30, upscaling_resize_h=20, upscaling_crop=True)]
    task_ids = [(await asyncio.to_thread(sdk.upscale, request)).data.task_id for request in requests]
    await env.fake.down()
    waits = [asyncio.create_task(asyncio.to_thread(sdk.wait_for_task, task_id, 120)) for task_id in task_ids]
    refused = await asyncio.to_thread(sdk.upscale, requests[0])  # submissions do fail while V3 is down
    assert refused.code.value == 5 and refused.data is None
    await asyncio.to_thread(sdk.upscale, requests[0])
    assert await breaker_gauge(env.client) == BreakerState.OPEN
    await asyncio.sleep(1.5)  # the SDK polls every 0.5 s: a few polls meet the outage
    assert not any(wait.done() for wait in waits)
    await env.fake.up()

    for (direct_or_composed, wait) in zip(("direct", "composed"), waits, strict=True):
        progress = await asyncio.wait_for(wait, 60)
        assert progress.code.value == 0 and progress.data.status.value == 2, (direct_or_composed, progress)
        async with env.client.session.get(progress.data.imgs[0]) as resp:
            size = decode(await resp.read()).size
        assert size == {"direct": (24, 18), "composed": (30, 20)}[direct_or_composed]
    assert await breaker_gauge(env.client) == BreakerState.CLOSED  # closed by a poll, long before the cool-down


async def test__task_store_down__a_composed_poll_answers_its_last_known_state_and_the_task_finishes(
        start_env, tmp_path):
    redis = RedisServer(redis_server_binary(), tmp_path / "redis")
    redis.start()
    try:
        env = await start_env(redis_url=redis.url, fingerprint_secret="one secret")
        _, composed = await env.accept_tasks()
        known = await poll(env.client, composed)
        redis.stop(keep=True)
        during = await poll(env.client, composed)
        assert during == known  # not code 5: the store's outage is the proxy's to ride through
        assert await ride_throughs(env.client) == {"last_known": 1}
        redis.start()
        await env.finish((composed,))
    finally:
        redis.stop()


# --- what a poll answers when it can't learn the state, on its own clock ------------------------------

RUNNING = {"status": 1, "progress": 0.5, "eta_relative": 3, "debug_info": {"submit_time_ms": 1000}}


def test__last_known__answers_the_last_data_then_past_the_grace_a_final_failure_with_the_reason():
    clock = Clock()
    known = LastKnown(grace=300, clock=clock)
    known.answered("t1", "fp", RUNNING)
    assert known.stand_in("t1", "fp", "V3: down") == (RUNNING, "last_known")
    clock.now += 300
    assert known.stand_in("t1", "fp", "V3: down") == (RUNNING, "last_known")
    clock.now += 1
    data, kind = known.stand_in("t1", "fp", "V3: down")
    assert kind == "past_grace" and data["status"] == 3 and data["debug_info"]["submit_time_ms"] == 1000
    assert data["failed_reason"].startswith("the upstream could not be reached for 301 s (V3: down)")


def test__last_known__an_answer_ends_the_outage_and_another_key_or_task_is_unseen():
    clock = Clock()
    known = LastKnown(grace=10, clock=clock)
    known.answered("t1", "fp", RUNNING)
    known.stand_in("t1", "fp", "V3: down")
    clock.now += 9
    known.answered("t1", "fp", RUNNING)  # V3 answered in between: the grace starts again
    clock.now += 9
    assert known.stand_in("t1", "fp", "V3: down")[1] == "last_known"
    data, kind = known.stand_in("t1", "another fp", "V3: down")
    assert kind == "unseen" and (data["status"], data["progress"], data["imgs"]) == (1, 0, None)


def test__last_known__a_final_answer_stands_past_any_grace_and_the_oldest_go_first():
    clock = Clock()
    known = LastKnown(grace=1, max_entries=2, clock=clock)
    done = {**RUNNING, "status": 2, "progress": 1, "imgs": ["https://v3.example/a.png"]}
    known.answered("t1", "fp", done)
    clock.now += 1000
    assert known.stand_in("t1", "fp", "V3: down") == (done, "last_known")
    known.answered("t2", "fp", RUNNING)
    known.answered("t3", "fp", RUNNING)
    assert len(known) == 2 and known.stand_in("t1", "fp", "V3: down")[1] == "unseen"


async def test__task_store_restarting__a_composed_submission_waits_for_it_and_a_longer_outage_gets_code_5(
        start_env, tmp_path):
    redis = RedisServer(redis_server_binary(), tmp_path / "redis")
    redis.start()
    try:
        env = await start_env(redis_url=redis.url, fingerprint_secret="one secret", redis_timeout=2)
        redis.stop(keep=True)
        async def restart() -> None:  # back within the 2 s wait
            await asyncio.sleep(0.5)
            await asyncio.to_thread(redis.start)

        restarted = asyncio.create_task(restart())
        reply = await upscale(env.client, body(COMPOSED))
        assert reply["code"] == 0, reply
        await restarted
        await env.finish((reply["data"]["task_id"],))
        submits = env.fake.calls["submit"]
        redis.stop(keep=True)  # longer than the wait: refused before V3 is asked
        refused = await upscale(env.client, body(COMPOSED))
        assert refused["code"] == 5 and "task store is unavailable" in refused["msg"], refused
        assert env.fake.calls["submit"] == submits
    finally:
        redis.stop()
