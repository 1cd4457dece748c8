"""The composed path's mechanics: progress, failures, deadlines, key binding, concurrency, expiry,
restarts, image fetching limits, face restoration on an A1111 server. What the composed pixels
are, release line by release line, is tests/test_a1111_profiles.py."""

from __future__ import annotations

import asyncio
import base64
import json

import aiohttp
import pytest
from PIL import Image

from proxy.app import create_app
from proxy.compose.fetch import FetchError, ImageFetcher
from proxy.compose.task import is_composed_id
from proxy.emulator import EMULATOR
from proxy.settings import Settings
from proxy.translate.steps import ImageTooLarge, decode
from tests.a1111 import A1111, native_pass_on
from tests.fake_a1111 import REQUESTS, create_fake_a1111, expected
from tests.helpers import (
    AUTH,
    CONTRACTS,
    closed_port_url,
    poll_until_done,
    run_v2,
    upscale,
    v2_call,
)
from tests.images import decode as decode_png
from tests.images import encode, pattern


async def test__alpha_input_on_the_direct_path__reaches_v3_without_alpha(proxy, emulator):
    data = encode(pattern(20, 10, "RGBA"), "PNG")
    reply = await upscale(proxy, {"image": base64.b64encode(data).decode(), "upscaler_1": "4x-UltraSharp",
                                  "upscaling_resize": 2})
    assert not is_composed_id(reply["data"]["task_id"])  # still one V3 job, answered by V3's URL
    result = await poll_until_done(proxy, reply["data"]["task_id"])
    async with proxy.session.get(result["imgs"][0]) as resp:
        assert decode(await resp.read()).mode == "RGB"


async def test__visibility_0__ignores_upscaler_2_and_goes_direct(proxy):
    reply = await upscale(proxy, {"image": base64.b64encode(encode(pattern(20, 10))).decode(),
                                  "upscaler_1": "4x-UltraSharp", "upscaling_resize": 2,
                                  "upscaler_2": "Lanczos", "extras_upscaler_2_visibility": 0})
    assert not is_composed_id(reply["data"]["task_id"])


async def test__progress_while_composing__is_running_then_done(start_emulator, start_proxy):
    server, _ = await start_emulator(queue_delay=0.2, process_delay=0.2)
    client = await start_proxy(str(server.make_url("")))
    body = {"image": base64.b64encode(encode(pattern(9, 9))).decode(), "upscaling_resize": 6}
    reply = await upscale(client, body)
    first = (await v2_call(client, "GET", f"/v2/progress?task_id={reply['data']['task_id']}"))["data"]
    assert first["status"] in (0, 1) and first["imgs"] is None and first["progress"] < 1
    assert first["eta_relative"] > 0 and first["submit_time"]
    done = await poll_until_done(client, reply["data"]["task_id"])
    assert done["status"] == 2 and done["progress"] == 1 and done["eta_relative"] == 0
    assert done["finish_time"] and done["debug_info"]["finish_time_ms"] >= done["debug_info"]["submit_time_ms"]


async def test__failed_v3_job__fails_the_task(start_emulator, start_proxy):
    server, _ = await start_emulator(fail_rate=1, fail_reason="out of memory")
    client = await start_proxy(str(server.make_url("")))
    reply = await upscale(client, {"image": base64.b64encode(encode(pattern(9, 9))).decode(), "upscaling_resize": 6})
    data = await poll_until_done(client, reply["data"]["task_id"])
    assert (data["status"], data["failed_reason"], data["imgs"]) == (3, "out of memory", None)


async def test__past_its_deadline__a_task_reports_status_4(start_emulator, start_proxy):
    server, _ = await start_emulator(process_delay=30)
    client = await start_proxy(str(server.make_url("")), compose_deadline=0.2)
    reply = await upscale(client, {"image": base64.b64encode(encode(pattern(9, 9))).decode(), "upscaling_resize": 6})
    await asyncio.sleep(0.3)
    data = (await v2_call(client, "GET", f"/v2/progress?task_id={reply['data']['task_id']}"))["data"]
    assert data["status"] == 4 and data["imgs"] is None and "deadline" in data["failed_reason"]


async def test__another_key__cannot_poll_the_task(proxy):
    reply = await upscale(proxy, {"image": base64.b64encode(encode(pattern(9, 9))).decode(), "upscaler_1": "Lanczos"})
    other = await v2_call(proxy, "GET", f"/v2/progress?task_id={reply['data']['task_id']}",
                          headers={"Authorization": "Bearer someone-else"})
    assert other["code"] == 3


async def test__concurrent_polls__submit_each_pass_once_and_compose_once(proxy, emulator, log_lines):
    _, emu = emulator
    reply = await upscale(proxy, {"image": base64.b64encode(encode(pattern(9, 9))).decode(), "upscaling_resize": 20})
    task_id = reply["data"]["task_id"]
    for _ in range(300):
        polls = await asyncio.gather(*(v2_call(proxy, "GET", f"/v2/progress?task_id={task_id}") for _ in range(8)))
        if any(p["data"]["status"] == 2 for p in polls):
            break
        await asyncio.sleep(0.01)
    assert emu.requests["submit"] == 3  # three native passes, each submitted once
    assert [line["task_id"] for line in log_lines if line["event"] == "composed"] == [task_id]


async def test__composed_image__expires_after_img_expire_ttl(start_emulator, start_proxy, tmp_path):
    server, _ = await start_emulator()
    client = await start_proxy(str(server.make_url("")), sweep_interval=0.1)
    reply = await upscale(client, {"image": base64.b64encode(encode(pattern(9, 9))).decode(),
                                   "upscaler_1": "Lanczos", "img_expire_ttl": 1})
    data = await poll_until_done(client, reply["data"]["task_id"])
    async with client.session.get(data["imgs"][0]) as resp:
        assert resp.status == 200
    assert (tmp_path / "data" / "results" / f"{reply['data']['task_id']}.png").exists()
    await asyncio.sleep(1.3)
    async with client.session.get(data["imgs"][0]) as resp:
        assert resp.status == 404
        assert (await resp.json())["code"] == 3
    assert list((tmp_path / "data" / "results").iterdir()) == []  # swept


async def test__restarted_proxy__carries_on_with_accepted_tasks(emulator, aiohttp_client, tmp_path):
    upstream = str(emulator[0].make_url(""))
    settings = Settings(upstream=upstream, data_dir=tmp_path / "data")
    first = await aiohttp_client(create_app(settings))
    body = {"image": base64.b64encode(encode(pattern(9, 9))).decode(), "upscaling_resize": 6}
    reply = await upscale(first, body)
    await first.close()  # the proxy goes away with the task in flight
    second = await aiohttp_client(create_app(settings))
    data = await poll_until_done(second, reply["data"]["task_id"])
    assert data["status"] == 2
    async with second.session.get(data["imgs"][0]) as resp:
        assert decode(await resp.read()).size == (54, 54)


async def test__unknown_composed_image__is_a_404_v2_body(proxy):
    async with proxy.get("/v2/images/0b9d5b0e-4c1e-8df1-a4c5-1f0d0f3d8a11.png") as resp:
        assert resp.status == 404
        assert (await resp.json())["code"] == 3


async def test__full_contract_body__matches_a1111_pixel_for_pixel(emulator, start_proxy):
    body = json.loads((CONTRACTS / "v2-upscale-request-full.json").read_text())
    data = encode(pattern(300, 260), "PNG")
    url = str(emulator[0].make_url(""))
    client = await start_proxy(url, policy_native_scale="emulate")
    reply, image = await run_v2(client, data, body)
    assert "gfpgan_visibility ignored" in reply["data"]["warn"]  # no face restorer configured
    want = await A1111("v1.3", native_pass_on(url)).upscale_script(decode_png(data).convert("RGB"), body)
    assert image.tobytes() == want.tobytes()


@pytest.fixture
async def face_server(aiohttp_server):
    return await aiohttp_server(create_fake_a1111())


async def test__face_restoration__runs_on_the_a1111_server_after_the_upscale(emulator, start_proxy, face_server):
    client = await start_proxy(str(emulator[0].make_url("")), face_restorer_url=str(face_server.make_url("")))
    body = {"upscaler_1": "Lanczos", "upscaling_resize": 2, "gfpgan_visibility": 0.5,
            "codeformer_visibility": 0.25, "codeformer_weight": 0.7}
    reply, image = await run_v2(client, encode(pattern(10, 8)), body)
    assert reply["data"]["warn"] == ""
    upscaled = pattern(10, 8).resize((20, 16), Image.Resampling.LANCZOS)
    assert image.tobytes() == expected(upscaled, 0.5, 0.25, 0.7).tobytes()
    [sent] = face_server.app[REQUESTS]
    assert (sent["upscaler_1"], sent["gfpgan_visibility"], sent["codeformer_visibility"]) == ("None", 0.5, 0.25)


async def test__face_restorer_down__fails_the_task_with_a_clear_reason(emulator, start_proxy):
    client = await start_proxy(str(emulator[0].make_url("")), face_restorer_url=closed_port_url())
    reply = await upscale(client, {"image": base64.b64encode(encode(pattern(10, 8))).decode(),
                                   "upscaler_1": "Lanczos", "gfpgan_visibility": 1})
    data = await poll_until_done(client, reply["data"]["task_id"])
    assert data["status"] == 3 and "face restorer is unreachable" in data["failed_reason"]
    assert "127.0.0.1" not in data["failed_reason"]


async def test__image_from_a_host_not_allowed__fails_the_task_naming_it(start_emulator, start_proxy):
    server, _ = await start_emulator()
    public = str(server.make_url("")).replace("127.0.0.1", "localhost")
    server.app[EMULATOR].settings.public_url = public  # V3 now hands out URLs on another host
    client = await start_proxy(str(server.make_url("")))
    reply = await upscale(client, {"image": base64.b64encode(encode(pattern(9, 9))).decode(), "upscaling_resize": 6})
    data = await poll_until_done(client, reply["data"]["task_id"])
    assert data["status"] == 3 and "'localhost' is not allowed" in data["failed_reason"]
    allowed = await start_proxy(str(server.make_url("")), image_hosts="localhost,other.example")
    reply = await upscale(allowed, {"image": base64.b64encode(encode(pattern(9, 9))).decode(), "upscaling_resize": 6})
    assert (await poll_until_done(allowed, reply["data"]["task_id"]))["status"] == 2


async def test__fetcher__refuses_images_over_its_cap_and_other_schemes(emulator):
    server, emu = emulator
    async with aiohttp.ClientSession(base_url=str(server.make_url("")), headers=AUTH) as http:
        body = {"request": {"model_name": "4x-UltraSharp", "scale_factor": 4,
                            "image_base64": base64.b64encode(encode(pattern(30, 30))).decode()}}
        async with http.post("/v3/async/upscale", json=body) as resp:
            task_id = (await resp.json())["task_id"]
        while True:
            async with http.get("/v3/async/task-result", params={"task_id": task_id}) as resp:
                result = await resp.json()
            if result["images"]:
                break
            await asyncio.sleep(0.01)
    url = result["images"][0]["image_url"]
    async with aiohttp.ClientSession() as session:
        fetch = ImageFetcher(session, frozenset({"127.0.0.1"}), max_bytes=1000, timeout=5)
        with pytest.raises(FetchError, match="over 1000 bytes"):
            await fetch.fetch(url)
        with pytest.raises(FetchError, match="scheme"):
            await fetch.fetch(url.replace("http://", "file://"))
        assert len(await ImageFetcher(session, frozenset({"127.0.0.1"}), 10**7, 5).fetch(url)) > 1000


def test__decoding__refuses_a_decompression_bomb_before_reading_pixels():
    bomb = encode(Image.new("1", (9000, 8000)), "PNG")  # 72 M pixels in a few kilobytes
    assert len(bomb) < 100_000
    with pytest.raises(ImageTooLarge):
        decode(bomb)
