"""V3's webhook: with webhooks on, V3 (the emulator) POSTs each finished job to the proxy, and
neither direct nor composed polls make a V3 task-result call; polling V3 stays the fallback."""

from __future__ import annotations

import base64

import pytest
from pydantic import ValidationError

from proxy.app import create_app
from proxy.keys import WEBHOOKS
from proxy.settings import Settings
from tests.helpers import free_port, poll_until_done, upscale
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
