"""The composed path, pixel for pixel: every V2 feature against an independent reading of spec
section 7, computed here with Pillow from the emulator's own output for each native 4x pass."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import aiohttp
import pytest
from PIL import Image

from proxy.app import create_app
from proxy.compose.fetch import FetchError, ImageFetcher
from proxy.compose.images import ImageTooLarge, decode_rgb
from proxy.compose.tasks import is_composed_id
from proxy.emulator import EMULATOR
from proxy.settings import Settings
from tests.helpers import AUTH, CONTRACTS, poll_until_done, upscale, v2_call
from tests.images import decode, encode, pattern

MODELS = {"R-ESRGAN 4x+ Anime6B": "RealESRGAN_x4plus_anime_6B", "R-ESRGAN 4x+": "RealESRNet_x4plus",
          "4x-UltraSharp": "4x-UltraSharp", "LDSR": "RealESRNet_x4plus"}
FILTERS = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}


class V2Reference:
    """What AUTOMATIC1111's extras produced (spec section 7), with each AI pass done by a real V3
    job on the emulator at scale_factor 4, the models' native factor."""

    def __init__(self, emulator_url: str) -> None:
        self.url = emulator_url

    async def native_pass(self, model: str, image: Image.Image) -> Image.Image:
        body = {"request": {"model_name": model, "scale_factor": 4,
                            "image_base64": base64.b64encode(encode(image, "PNG")).decode()}}
        async with aiohttp.ClientSession(base_url=self.url, headers=AUTH) as http:
            async with http.post("/v3/async/upscale", json=body) as resp:
                task_id = (await resp.json())["task_id"]
            while True:
                async with http.get("/v3/async/task-result", params={"task_id": task_id}) as resp:
                    result = await resp.json()
                if result["task"]["status"] == "TASK_STATUS_SUCCEED":
                    break
                await asyncio.sleep(0.01)
            async with http.get(result["images"][0]["image_url"]) as resp:
                return decode(await resp.read()).convert("RGB")

    async def upscale_one(self, src: Image.Image, name: str, factor: float,
                          crop: tuple[int, int] | None) -> Image.Image:
        target = (int(src.width * factor), int(src.height * factor))
        image = src
        if name in FILTERS:
            if target != src.size:
                image = src.resize(target, FILTERS[name] if factor > 1 else Image.Resampling.LANCZOS)
        else:
            for _ in range(3):
                if image.width >= target[0] and image.height >= target[1]:
                    break
                image = await self.native_pass(MODELS[name], image)
            if image.size != target:
                image = image.resize(target, Image.Resampling.LANCZOS)
        if crop:
            canvas = Image.new("RGB", crop)
            canvas.paste(image, (crop[0] // 2 - image.width // 2, crop[1] // 2 - image.height // 2))
            image = canvas
        return image

    async def __call__(self, data: bytes, body: dict) -> Image.Image:
        src = Image.open(io.BytesIO(data)).convert("RGB")
        if body.get("upscaler_1") == "None":
            return src
        if body.get("resize_mode") == 1:
            w, h = body["upscaling_resize_w"], body["upscaling_resize_h"]
            factor = max(w / src.width, h / src.height)
            crop = (w, h) if body.get("upscaling_crop") else None
        else:
            factor, crop = body.get("upscaling_resize", 2), None
        out = await self.upscale_one(src, body.get("upscaler_1", "R-ESRGAN 4x+"), factor, crop)
        visibility = body.get("extras_upscaler_2_visibility") or 0
        if body.get("upscaler_2") and body["upscaler_2"] != "None" and visibility > 0:
            second = await self.upscale_one(src, body["upscaler_2"], factor, crop)
            out = Image.blend(out, second, visibility)
        return out


@pytest.fixture
def reference(emulator) -> V2Reference:
    return V2Reference(str(emulator[0].make_url("")))


async def run_v2(client, data: bytes, body: dict) -> tuple[dict, Image.Image]:
    reply = await upscale(client, {**body, "image": base64.b64encode(data).decode()})
    assert reply["code"] == 0, reply
    result = await poll_until_done(client, reply["data"]["task_id"])
    assert result["status"] == 2, result
    async with client.session.get(result["imgs"][0]) as resp:
        assert resp.status == 200 and resp.content_type == "image/png"
        image = decode(await resp.read())
    return reply, image


def assert_same_pixels(actual: Image.Image, expected: Image.Image) -> None:
    assert actual.mode == "RGB" and actual.size == expected.size
    assert actual.tobytes() == expected.tobytes()


CASES = {
    "scale to with crop": ((64, 48), {"resize_mode": 1, "upscaling_resize_w": 200, "upscaling_resize_h": 200,
                                      "upscaling_crop": True, "upscaler_1": "R-ESRGAN 4x+ Anime6B"}),
    "scale to without crop": ((64, 48), {"resize_mode": 1, "upscaling_resize_w": 100, "upscaling_resize_h": 100,
                                         "upscaling_crop": False, "upscaler_1": "4x-UltraSharp"}),
    "crop wider than the scaled image": ((3, 7), {"resize_mode": 1, "upscaling_resize_w": 10,
                                                  "upscaling_resize_h": 5, "upscaling_crop": True,
                                                  "upscaler_1": "R-ESRGAN 4x+"}),
    "factor 6: two native passes": ((17, 11), {"upscaling_resize": 6, "upscaler_1": "R-ESRGAN 4x+ Anime6B"}),
    "factor 20: three passes": ((5, 3), {"upscaling_resize": 20, "upscaler_1": "4x-UltraSharp"}),
    "factor exactly 1": ((33, 21), {"upscaling_resize": 1, "upscaler_1": "R-ESRGAN 4x+"}),
    "factor 0.5": ((33, 21), {"upscaling_resize": 0.5, "upscaler_1": "R-ESRGAN 4x+"}),
    "blend of two upscalers": ((40, 30), {"upscaling_resize": 2.5, "upscaler_1": "R-ESRGAN 4x+ Anime6B",
                                          "upscaler_2": "4x-UltraSharp", "extras_upscaler_2_visibility": 0.35}),
    "blend with a local upscaler": ((40, 30), {"upscaling_resize": 3, "upscaler_1": "Lanczos",
                                               "upscaler_2": "R-ESRGAN 4x+", "extras_upscaler_2_visibility": 0.5}),
    "blend at visibility 1": ((21, 13), {"upscaling_resize": 2, "upscaler_1": "Nearest",
                                         "upscaler_2": "Lanczos", "extras_upscaler_2_visibility": 1}),
    "lanczos": ((31, 17), {"upscaling_resize": 3.3, "upscaler_1": "Lanczos"}),
    "nearest": ((31, 17), {"upscaling_resize": 2, "upscaler_1": "Nearest"}),
    "nearest shrinking is lanczos": ((31, 17), {"upscaling_resize": 0.6, "upscaler_1": "Nearest"}),
    "none": ((31, 17), {"upscaling_resize": 3, "upscaler_1": "None", "resize_mode": 0}),
    "none ignores crop and blend": ((31, 17), {"resize_mode": 1, "upscaling_resize_w": 64, "upscaling_resize_h": 64,
                                               "upscaling_crop": True, "upscaler_1": "None",
                                               "upscaler_2": "Lanczos", "extras_upscaler_2_visibility": 0.5}),
    "scale-to factor exactly 4": ((50, 25), {"resize_mode": 1, "upscaling_resize_w": 200, "upscaling_resize_h": 60,
                                             "upscaling_crop": True, "upscaler_1": "4x-UltraSharp"}),
    "extreme aspect ratio": ((400, 2), {"resize_mode": 1, "upscaling_resize_w": 2000, "upscaling_resize_h": 40,
                                        "upscaling_crop": True, "upscaler_1": "Lanczos"}),
    "everything at once": ((64, 48), {"resize_mode": 1, "upscaling_resize_w": 512, "upscaling_resize_h": 300,
                                      "upscaling_crop": True, "upscaler_1": "R-ESRGAN 4x+",
                                      "upscaler_2": "R-ESRGAN 4x+ Anime6B", "extras_upscaler_2_visibility": 0.5,
                                      "gfpgan_visibility": 0.7}),
}


@pytest.mark.parametrize("case", list(CASES))
async def test__composed_feature__matches_v2_pixel_for_pixel(proxy, reference, case):
    size, body = CASES[case]
    data = encode(pattern(*size), "PNG")
    reply, image = await run_v2(proxy, data, body)
    assert is_composed_id(reply["data"]["task_id"])
    assert_same_pixels(image, await reference(data, body))


@pytest.mark.parametrize(("fmt", "mode"), [("PNG", "RGBA"), ("PNG", "P"), ("JPEG", "RGB"), ("WEBP", "RGB"),
                                           ("WEBP", "RGBA")])
async def test__input_formats_and_alpha__compose_as_v2_did(proxy, reference, fmt, mode):
    data = encode(pattern(23, 19, mode), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    body = {"resize_mode": 1, "upscaling_resize_w": 50, "upscaling_resize_h": 40, "upscaling_crop": True,
            "upscaler_1": "R-ESRGAN 4x+ Anime6B"}
    _, image = await run_v2(proxy, data, body)
    assert_same_pixels(image, await reference(data, body))


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


async def test__full_contract_body__matches_v2_pixel_for_pixel(proxy, reference):
    body = json.loads((CONTRACTS / "v2-upscale-request-full.json").read_text())
    data = encode(pattern(300, 260), "PNG")
    reply, image = await run_v2(proxy, data, body)
    assert "gfpgan_visibility ignored" in reply["data"]["warn"]
    assert_same_pixels(image, await reference(data, body))


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
        decode_rgb(bomb)
