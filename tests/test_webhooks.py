"""V3's webhook: with webhooks on, V3 (the emulator) POSTs each finished job to the proxy, and
neither direct nor composed polls make a V3 task-result call; polling V3 stays the fallback."""

from __future__ import annotations

import base64

import pytest
from pydantic import ValidationError

from proxy.app import create_app
from proxy.compose import engine as engine_module
from proxy.fingerprint import fingerprint
from proxy.keys import SECRET, TASKS, WEBHOOKS
from proxy.settings import Settings
from proxy.webhooks import Owner, WebhookTokens
from tests.helpers import KEY, free_port, poll_until_done, upscale
from tests.images import encode, pattern


@pytest.fixture
def start_reachable_proxy(aiohttp_client, tmp_path):
    """A proxy on a known loopback port, so that it can tell V3 where to call it back."""

    async def start(upstream: str, **overrides):
        port = free_port()
        settings = Settings(upstream=upstream, data_dir=tmp_path / "data", webhooks=True,
                            public_url=f"http://127.0.0.1:{port}", poll_cache_seconds=0, **overrides)
        return await aiohttp_client(create_app(settings), server_kwargs={"port": port})

    return start


def image(w: int = 16, h: int = 12) -> str:
    return base64.b64encode(encode(pattern(w, h))).decode()


async def test__direct_task_with_a_webhook__is_answered_without_task_result_calls(start_emulator,
                                                                                  start_reachable_proxy):
    server, emu = await start_emulator(queue_delay=0.05, process_delay=0.05)
    proxy = await start_reachable_proxy(str(server.make_url("")))
    reply = await upscale(proxy, {"image": image(), "upscaler_1": "4x-UltraSharp", "upscaling_resize": 2})
    data = await poll_until_done(proxy, reply["data"]["task_id"])
    assert data["status"] == 2 and data["imgs"]
    assert emu.requests["result"] == 0 and emu.requests["webhook"] >= 1


async def test__composed_task_with_webhooks__never_calls_task_result(start_emulator, start_reachable_proxy):
    server, emu = await start_emulator(queue_delay=0.02, process_delay=0.02)
    proxy = await start_reachable_proxy(str(server.make_url("")))
    reply = await upscale(proxy, {"image": image(5, 3), "upscaler_1": "4x-UltraSharp", "upscaling_resize": 20,
                                  "upscaler_2": "R-ESRGAN 4x+ Anime6B", "extras_upscaler_2_visibility": 0.5})
    data = await poll_until_done(proxy, reply["data"]["task_id"])
    assert data["status"] == 2
    assert emu.requests["result"] == 0 and emu.requests["submit"] == 6  # three passes a branch


async def test__without_the_webhook__polling_v3_is_the_fallback(start_emulator, start_reachable_proxy):
    server, emu = await start_emulator(queue_delay=0.02, process_delay=0.02, webhooks=False)
    proxy = await start_reachable_proxy(str(server.make_url("")), webhook_fallback=0.2)
    composed = await upscale(proxy, {"image": image(5, 3), "upscaler_1": "4x-UltraSharp", "upscaling_resize": 6})
    direct = await upscale(proxy, {"image": image(), "upscaler_1": "4x-UltraSharp", "upscaling_resize": 2})
    assert (await poll_until_done(proxy, composed["data"]["task_id"]))["status"] == 2
    assert (await poll_until_done(proxy, direct["data"]["task_id"]))["status"] == 2
    assert emu.requests["result"] >= 3


async def test__webhook_route__refuses_unknown_tokens_and_bodies_that_are_no_event(start_emulator,
                                                                                   start_reachable_proxy):
    server, _ = await start_emulator()
    proxy = await start_reachable_proxy(str(server.make_url("")))
    async with proxy.post("/_proxy/webhooks/v3/not-a-token", json={"event_type": "ASYNC_TASK_RESULT"}) as resp:
        assert resp.status == 404
    token = proxy.server.app[WEBHOOKS].issue("fp").rsplit("/", 1)[1]
    async with proxy.post(f"/_proxy/webhooks/v3/{token}", data=b"not json") as resp:
        assert resp.status == 400
    async with proxy.post(f"/_proxy/webhooks/v3/{token}", json={"event_type": "SOMETHING_ELSE"}) as resp:
        assert resp.status == 204
    async with proxy.post(f"/_proxy/webhooks/v3/{token}",
                          json={"event_type": "ASYNC_TASK_RESULT", "payload": {"task": "no"}}) as resp:
        assert resp.status == 400


def test__webhooks__need_a_public_url():
    with pytest.raises(ValidationError, match="UPSCALE_PROXY_PUBLIC_URL"):
        Settings(webhooks=True)


# the tokens: self-verifying, nothing stored

BASE = "http://proxy.example"
TASK = "0b8f6a2e-93c1-8d4e-a1f0-5c3e2d1b0a99"


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def token_of(url: str) -> str:
    assert url.startswith(BASE + "/_proxy/webhooks/v3/")
    return url.rsplit("/", 1)[1]


def test__a_token__is_accepted_by_another_instance_with_the_same_secret():
    clock = Clock()
    issuer, other = (WebhookTokens(BASE, ttl=900, secret=b"shared secret", clock=clock) for _ in range(2))
    direct, composed = token_of(issuer.issue("3f9a1c0e5b7d2a64")), token_of(issuer.issue("3f9a1c0e5b7d2a64", TASK))
    assert other.owner(direct) == Owner("3f9a1c0e5b7d2a64", None, clock.now + 901)
    assert other.owner(composed) == Owner("3f9a1c0e5b7d2a64", TASK, clock.now + 901)
    lazy = WebhookTokens(BASE, ttl=900, secret=lambda: b"shared secret", clock=clock)  # the app's secret, once started
    assert lazy.owner(composed) == other.owner(composed)


def test__a_token__is_refused_with_another_secret_or_without_one():
    issuer = WebhookTokens(BASE, ttl=900, secret=b"shared secret")
    token = token_of(issuer.issue("fp", TASK))
    assert WebhookTokens(BASE, ttl=900, secret=b"another secret").owner(token) is None
    # no secret: each instance (each process) has a random one of its own
    first, second = WebhookTokens(BASE, ttl=900), WebhookTokens(BASE, ttl=900)
    own = token_of(first.issue("fp"))
    assert first.owner(own) is not None and second.owner(own) is None


def test__a_token__is_refused_once_expired():
    clock = Clock()
    tokens = WebhookTokens(BASE, ttl=60, secret=b"s", clock=clock)
    token = token_of(tokens.issue("fp", TASK))
    clock.now += 60
    assert tokens.owner(token) is not None
    clock.now += 2
    assert tokens.owner(token) is None


def test__a_token_with_any_one_character_changed__is_refused():
    tokens = WebhookTokens(BASE, ttl=900, secret=b"s")
    token = token_of(tokens.issue("3f9a1c0e5b7d2a64", TASK))
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for i, c in enumerate(token):
        for other in (alphabet[(alphabet.index(c) + 1) % 64], "=", "!", "+"):
            assert tokens.owner(token[:i] + other + token[i + 1:]) is None, (i, other)
    for malformed in ("", "not-a-token", token[:-1], token + "A", token + "=", token[:40], "é" * 90, "A" * 5000):
        assert tokens.owner(malformed) is None, malformed


async def test__a_token__carries_the_fingerprint_never_the_key(start_emulator, start_reachable_proxy):
    server, emu = await start_emulator(queue_delay=0.02, process_delay=0.02)
    proxy = await start_reachable_proxy(str(server.make_url("")))
    reply = await upscale(proxy, {"image": image(), "upscaler_1": "4x-UltraSharp", "upscaling_resize": 2})
    await poll_until_done(proxy, reply["data"]["task_id"])
    [(url, outcome)] = emu.webhook_calls
    token = url.rsplit("/", 1)[1]
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    assert outcome == 204
    assert KEY not in url and KEY.encode() not in raw and KEY.encode().hex().encode() not in raw
    assert proxy.server.app[WEBHOOKS].owner(token).fingerprint == fingerprint(KEY, proxy.server.app[SECRET])


async def test__delivered_results_past_the_bound__the_oldest_goes_and_is_counted(start_emulator,
                                                                                  start_reachable_proxy,
                                                                                  monkeypatch):
    monkeypatch.setattr(engine_module, "MAX_DELIVERED", 2)
    server, _ = await start_emulator()
    proxy = await start_reachable_proxy(str(server.make_url("")))
    token = proxy.server.app[WEBHOOKS].issue("fp", TASK).rsplit("/", 1)[1]
    for job in ("job-1", "job-2", "job-1", "job-3"):  # job-1 sent again by V3: now the newest
        event = {"event_type": "ASYNC_TASK_RESULT",
                 "payload": {"task": {"task_id": job, "status": "TASK_STATUS_SUCCEED"}, "images": []}}
        async with proxy.post(f"/_proxy/webhooks/v3/{token}", json=event) as resp:
            assert resp.status == 204
    assert list(proxy.server.app[TASKS]._delivered) == ["job-1", "job-3"]
    async with proxy.get("/metrics") as resp:
        assert "upscale_proxy_webhook_results_evicted_total 1.0" in (await resp.text()).splitlines()
