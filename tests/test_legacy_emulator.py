"""The legacy V2 emulator against the V2 spec: A1111's extras per release line (pixel for pixel
against the oracle), V2's codes, progress, key binding, faults, a removed V2, and how it runs."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
import urllib.request

import aiohttp
import pytest
from PIL import Image, ImageChops, ImageStat

from proxy.app import create_app
from proxy.emulator import LEGACY_V2, LegacySettings, create_legacy_app
from proxy.emulator.legacy import LegacyV2
from proxy.settings import Settings
from tests.a1111 import A1111, RELEASES, native_pass_on
from tests.helpers import CONTRACTS, KEY, check_progress_reply, free_port
from tests.images import decode, encode, pattern
from tests.test_cli import LegacyClient, running

AUTH = {"Authorization": f"Bearer {KEY}"}
PNG = lambda w, h, mode="RGB": encode(pattern(w, h, mode), "PNG")  # noqa: E731
B64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
ROUND_TRIPS = {
    "scale by, a model": (PNG(30, 22), {"upscaler_1": "R-ESRGAN 4x+ Anime6B", "upscaling_resize": 2.5}),
    "scale by, a model V3 lacks, two passes": (PNG(9, 7), {"upscaler_1": "R-ESRGAN 4x+", "upscaling_resize": 6}),
    "scale to, crop": (PNG(32, 24), {"upscaler_1": "4x-UltraSharp", "resize_mode": 1, "upscaling_resize_w": 100,
                                     "upscaling_resize_h": 60, "upscaling_crop": True, "upscaling_resize": 2.0}),
    "lanczos": (PNG(31, 17), {"upscaler_1": "Lanczos", "upscaling_resize": 3.3}),
    "upscaler_2 blend": (PNG(40, 30), {"upscaler_1": "R-ESRGAN 4x+", "upscaler_2": "Lanczos",
                                       "extras_upscaler_2_visibility": 0.35, "upscaling_resize": 2}),
    "face visibility": (PNG(24, 16), {"upscaler_1": "Nearest", "upscaling_resize": 2, "gfpgan_visibility": 0.6,
                                      "codeformer_visibility": 0.5, "codeformer_weight": 0.3}),
    "rgba, none": (PNG(23, 19, "RGBA"), {"upscaler_1": "None", "upscaler_2": "Lanczos",
                                         "extras_upscaler_2_visibility": 0.5}),
}


@pytest.fixture
def start_legacy(aiohttp_server):
    """Start a legacy V2 emulator on loopback, fast unless told otherwise; (base URL, its state)."""

    async def start(**overrides) -> tuple[str, LegacyV2]:
        app = create_legacy_app(LegacySettings(**{"queue_delay": 0.02, "process_delay": 0.02, **overrides}))
        server = await aiohttp_server(app)
        return str(server.make_url("")), app[LEGACY_V2]

    return start


@pytest.fixture
async def v2(start_legacy):
    url, _ = await start_legacy()
    async with aiohttp.ClientSession(base_url=url, headers=AUTH) as http:
        yield http


async def call(http: aiohttp.ClientSession, method: str, path: str, **kw) -> dict:
    """One V2 call: HTTP 200, JSON, the V2 envelope; `data` null with a non-zero code."""
    async with http.request(method, path, **kw) as resp:
        assert resp.status == 200 and resp.content_type == "application/json", await resp.text()
        doc = await resp.json()
    assert set(doc) == {"code", "msg", "data"}
    assert (doc["data"] is None) == (doc["code"] != 0), doc
    return doc


async def submit(http, body: dict, **kw) -> dict:
    return await call(http, "POST", "/v2/upscale", json=body, **kw)


async def poll(http, task_id: str, **kw) -> dict:
    return await call(http, "GET", "/v2/progress", params={"task_id": task_id}, **kw)


async def finished(http, task_id: str) -> dict:
    for _ in range(500):
        doc = await poll(http, task_id)
        assert doc["code"] == 0, doc
        check_progress_reply(doc)  # every field, and the legacy SDK's own parser
        if doc["data"]["status"] in (2, 3):
            return doc["data"]
        await asyncio.sleep(0.01)
    raise AssertionError("task never finished")


async def run_v2(http, data: bytes, body: dict) -> Image.Image:
    reply = await submit(http, {**body, "image": B64(data)})
    assert reply["code"] == 0, reply
    result = await finished(http, reply["data"]["task_id"])
    assert result["status"] == 2, result
    async with http.get(result["imgs"][0]) as resp:
        assert resp.status == 200 and resp.content_type == "image/png"
        return decode(await resp.read())


def assert_same_image(actual: Image.Image, expected: Image.Image) -> None:
    assert (actual.mode, actual.size) == (expected.mode, expected.size)
    assert actual.tobytes() == expected.tobytes()
    assert actual.info.get("transparency") == expected.info.get("transparency")


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    """The mean absolute difference of two same-size images, per channel value (0-255)."""
    assert a.size == b.size
    return sum(ImageStat.Stat(ImageChops.difference(a.convert("RGB"), b.convert("RGB"))).mean) / 3


# ---- A1111's extras, per release line ----

@pytest.mark.parametrize("line", ["v1.3", "v1.10"])
@pytest.mark.parametrize("case", list(ROUND_TRIPS))
async def test__round_trip__is_a1111s_extras_of_the_line_pixel_for_pixel(start_legacy, line, case):
    url, _ = await start_legacy(a1111_profile=line)
    data, body = ROUND_TRIPS[case]
    async with aiohttp.ClientSession(base_url=url, headers=AUTH) as http:
        image = await run_v2(http, data, body)
    assert_same_image(image, await A1111(line).extras(data, body))


async def test__lines__differ_where_the_spec_says(start_legacy):
    """A size that is not a multiple of 8: v1.3 keeps it, v1.6 rounds down; an RGBA input: the
    alpha goes before v1.9, and stays from it."""
    images = {}
    for line in ("v1.3", "v1.6", "v1.8", "v1.9"):
        url, _ = await start_legacy(a1111_profile=line)
        async with aiohttp.ClientSession(base_url=url, headers=AUTH) as http:
            images[line] = (await run_v2(http, PNG(30, 22), {"upscaler_1": "Lanczos", "upscaling_resize": 2}),
                            await run_v2(http, PNG(16, 16, "RGBA"), {"upscaler_1": "Lanczos", "upscaling_resize": 2}))
    assert images["v1.3"][0].size == (60, 44) and images["v1.6"][0].size == (56, 40)
    assert (images["v1.8"][1].mode, images["v1.9"][1].mode) == ("RGB", "RGBA")


async def test__model_v3_has__is_the_v3_model_and_one_it_lacks_differs_a_little(v2, start_emulator):
    """Same weights: V2's image is what the oracle makes of V3 jobs. R-ESRGAN 4x+, which the
    proxy approximates with RealESRNet_x4plus: the same size, close, but not the same pixels."""
    server, _ = await start_emulator(queue_delay=0, process_delay=0)
    through_v3 = A1111("v1.3", native_pass_on(str(server.make_url(""))))
    data = PNG(30, 22)
    body = {"upscaler_1": "R-ESRGAN 4x+ Anime6B", "upscaling_resize": 2}
    assert_same_image(await run_v2(v2, data, body), await through_v3.extras(data, body))
    body = {"upscaler_1": "R-ESRGAN 4x+", "upscaling_resize": 2}
    legacy, translated = await run_v2(v2, data, body), await through_v3.extras(data, body)
    assert legacy.size == translated.size
    assert 0 < mean_difference(legacy, translated) < 8


async def test__a1111_failure__is_status_3_with_the_reason(v2):
    """A palette PNG with per-entry alpha made A1111 (up to 1.8) fail: V2's task failed."""
    im = pattern(16, 16).quantize(16)
    im.info["transparency"] = bytes(range(0, 256, 16))
    reply = await submit(v2, {"image": B64(encode(im, "PNG")), "upscaler_1": "Lanczos"})
    result = await finished(v2, reply["data"]["task_id"])
    assert result["status"] == 3 and "A1111" in result["failed_reason"] and result["imgs"] is None


# ---- the V2 surface: replies, progress, codes ----

async def test__sdk_default_body__is_answered_as_the_contract_samples(v2):
    body = json.loads((CONTRACTS / "v2-upscale-request-sdk-default.json").read_text())
    reply = await submit(v2, {**body, "image": B64(PNG(20, 12))})
    sample = json.loads((CONTRACTS / "v2-upscale-reply.json").read_text())
    assert reply["code"] == 0 and set(reply["data"]) == set(sample["data"]) and reply["data"]["warn"] == ""
    data = await finished(v2, reply["data"]["task_id"])
    expected = json.loads((CONTRACTS / "v2-progress-reply-successful.json").read_text())["data"]
    assert set(data) == set(expected) and set(data["debug_info"]) == set(expected["debug_info"])
    for name, value in expected.items():
        assert isinstance(data[name], type(value)) or isinstance(value, (int, float)), name
    assert data["progress"] == 1 and data["eta_relative"] == 0 and len(data["imgs"]) == 1
    assert time.strptime(data["finish_time"], "%Y-%m-%d %H:%M:%S")
    assert data["debug_info"]["submit_time_ms"] <= data["debug_info"]["finish_time_ms"]


async def test__status__goes_0_1_2_over_the_delays(start_legacy):
    url, _ = await start_legacy(queue_delay=0.15, process_delay=0.15)
    async with aiohttp.ClientSession(base_url=url, headers=AUTH) as http:
        reply = await submit(http, {"image": B64(PNG(8, 8)), "upscaler_1": "Nearest"})
        seen = []
        for _ in range(100):
            data = (await poll(http, reply["data"]["task_id"]))["data"]
            if not seen or seen[-1][0] != data["status"]:
                seen.append((data["status"], data["imgs"], data["execution_time"], data["finish_time"]))
            if data["status"] == 2:
                break
            await asyncio.sleep(0.02)
    assert [s[0] for s in seen] == [0, 1, 2]
    assert seen[0][1:] == (None, "", "") and seen[1][1] is None and seen[1][2] and not seen[1][3]


def body_with(**fields) -> dict:
    return {"image": B64(PNG(16, 12)), "upscaler_1": "Lanczos", **fields}


@pytest.mark.parametrize(("raw", "code"), [
    (b"{not json", 1),
    (b"[1, 2]", 1),
    (json.dumps({"upscaler_1": "Lanczos"}).encode(), 1),  # no image
    (json.dumps(body_with(upscaling_resize="2")).encode(), 1),
    (json.dumps(body_with(upscaling_crop="yes")).encode(), 1),
    (json.dumps(body_with(resize_mode=1, upscaling_resize_w=64)).encode(), 1),  # no height in mode 1
    (json.dumps(body_with(upscaler_1="R-ESRGAN 8x")).encode(), 2),
    (json.dumps(body_with(upscaler_1="")).encode(), 2),
    (json.dumps(body_with(upscaler_2="Bicubic", extras_upscaler_2_visibility=0.5)).encode(), 2),
    (json.dumps(body_with(resize_mode=2)).encode(), 6),
    (json.dumps(body_with(upscaling_resize=0)).encode(), 6),
    (json.dumps(body_with(resize_mode=1, upscaling_resize_w=0, upscaling_resize_h=64)).encode(), 6),
    (json.dumps(body_with(gfpgan_visibility=1.5)).encode(), 6),
    (json.dumps(body_with(extras_upscaler_2_visibility=-0.1)).encode(), 6),
    (json.dumps(body_with(img_expire_ttl=604801)).encode(), 6),
    (json.dumps(body_with(image="@@not base64@@")).encode(), 6),
    (json.dumps(body_with(image=B64(b"plain text, not an image"))).encode(), 6),
    (json.dumps(body_with(image="data:text/plain," + B64(PNG(8, 8)))).encode(), 6),
    (json.dumps(body_with(upscaling_resize=129)).encode(), 6),  # 2064 px wide
    (json.dumps(body_with(resize_mode=1, upscaling_resize_w=2049, upscaling_resize_h=8,
                          upscaling_crop=True)).encode(), 6),
])
async def test__bad_input__is_v2s_code_with_http_200(v2, raw, code):
    doc = await call(v2, "POST", "/v2/upscale", data=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert doc["code"] == code and doc["msg"], doc


@pytest.mark.parametrize("body", [
    body_with(upscaler_1=None),  # the SDK default, R-ESRGAN 4x+
    body_with(image="data:image/png;base64," + B64(PNG(16, 12))),
    body_with(resize_mode=0, upscaling_resize_w=0, upscaling_resize_h=0, upscaling_resize=2.0),
    body_with(resize_mode=1, upscaling_resize_w=40.0, upscaling_resize_h=30, upscaling_resize=0),
    body_with(upscaler_2="Bicubic", extras_upscaler_2_visibility=0),  # ignored: no visibility
    body_with(upscaler_2="", extras_upscaler_2_visibility=0.5),
    body_with(upscaling_resize=128),  # 2048 px wide: the limit itself
])
async def test__what_v2_took__is_accepted(v2, body):
    assert (await submit(v2, body))["code"] == 0


async def test__side_rounding_to_0_from_v1_4__is_code_6(start_legacy):
    for line, code in (("v1.3", 0), ("v1.6", 6)):
        url, _ = await start_legacy(a1111_profile=line)
        async with aiohttp.ClientSession(base_url=url, headers=AUTH) as http:
            assert (await submit(http, {"image": B64(PNG(40, 3)), "upscaler_1": "Lanczos"}))["code"] == code


async def test__unknown_task__is_code_3(v2):
    assert (await poll(v2, "0b9d5b0e-4c1e-4df1-a4c5-1f0d0f3d8a11"))["code"] == 3
    assert (await call(v2, "GET", "/v2/progress"))["code"] == 3


# ---- keys ----

@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {KEY}"}, {"Authorization": KEY},
                                     {"X-Omni-Key": KEY}, {"Authorization": "Bearer", "X-Omni-Key": KEY}])
async def test__every_way_v2_clients_send_a_key__is_one_key(v2, headers):
    reply = await submit(v2, body_with(), headers=headers)
    assert (await poll(v2, reply["data"]["task_id"], headers=AUTH))["code"] == 0
    assert (await poll(v2, reply["data"]["task_id"], headers={"X-Omni-Key": KEY}))["code"] == 0


async def test__a_task__is_bound_to_its_key(v2):
    reply = await submit(v2, body_with())
    assert (await poll(v2, reply["data"]["task_id"], headers={"Authorization": "Bearer another"}))["code"] == 3


@pytest.mark.parametrize("headers", [{}, {"Authorization": ""}, {"Authorization": "Bearer "}, {"X-Omni-Key": " "}])
async def test__no_key__is_code_4(v2, headers):
    assert (await submit(v2, body_with(), headers={"Authorization": "", **headers}))["code"] == 4
    assert (await poll(v2, "x", headers={"Authorization": "", **headers}))["code"] == 4


async def test__api_keys__refuse_other_keys_with_code_4(start_legacy):
    url, _ = await start_legacy(api_keys=["a", "b"])
    async with aiohttp.ClientSession(base_url=url) as http:
        assert (await submit(http, body_with(), headers={"Authorization": "Bearer c"}))["code"] == 4
        assert (await submit(http, body_with(), headers={"X-Omni-Key": "b"}))["code"] == 0


# ---- images ----

async def test__image__lives_for_img_expire_ttl(start_legacy):
    url, emu = await start_legacy()
    async with aiohttp.ClientSession(base_url=url, headers=AUTH) as http:
        reply = await submit(http, body_with(img_expire_ttl=7200))
        data = await finished(http, reply["data"]["task_id"])
        task = emu.tasks[reply["data"]["task_id"]]
        assert task.ttl == 7200 and emu.tasks.bytes == len(task.result)  # the input is gone
        async with http.get(data["imgs"][0]) as resp:
            assert resp.status == 200
        task.ttl = 0  # as if its time had passed
        async with http.get(data["imgs"][0]) as resp:
            assert resp.status == 403
        emu.sweep(time.time() + 120)
        assert (await poll(http, reply["data"]["task_id"]))["code"] == 3
        async with http.get(f"/v2/images/{reply['data']['task_id']}.png") as resp:
            assert resp.status == 404
    assert (emu.requests["upscale"], emu.requests["image"]) == (1, 3)


async def test__image_of_a_task_not_done__is_404(start_legacy):
    url, _ = await start_legacy(queue_delay=5)
    async with aiohttp.ClientSession(base_url=url, headers=AUTH) as http:
        reply = await submit(http, body_with())
        async with http.get(f"/v2/images/{reply['data']['task_id']}.png") as resp:
            assert resp.status == 404


async def test__public_url__is_where_imgs_point(start_legacy):
    url, _ = await start_legacy(public_url="https://v2-images.example.test/")
    async with aiohttp.ClientSession(base_url=url, headers=AUTH) as http:
        data = await finished(http, (await submit(http, body_with()))["data"]["task_id"])
    assert data["imgs"][0].startswith("https://v2-images.example.test/v2/images/")


# ---- faults ----

async def test__injected_code__at_a_limit_then_healthy(start_legacy):
    url, emu = await start_legacy(error_code=5, error_limit=1)
    async with aiohttp.ClientSession(base_url=url, headers=AUTH) as http:
        assert (await submit(http, body_with()))["code"] == 5
        reply = await submit(http, body_with())
        assert reply["code"] == 0
        emu.settings.error_code, emu.settings.error_limit = -1, None  # flipped at run time
        emu.settings.error_endpoints = ["progress"]
        assert (await poll(http, reply["data"]["task_id"]))["code"] == -1
        assert (await submit(http, body_with()))["code"] == 0
        emu.settings.error_endpoints = ["image"]
        data = await finished(http, reply["data"]["task_id"])
        async with http.get(data["imgs"][0]) as resp:
            assert resp.status == 503
    assert emu.injected == 3


async def test__injected_code__at_a_rate(start_legacy):
    url, emu = await start_legacy(error_code=9, error_rate=0.5, seed=7)
    async with aiohttp.ClientSession(base_url=url, headers=AUTH) as http:
        codes = [(await poll(http, "x"))["code"] for _ in range(40)]
    assert set(codes) == {3, 9} and 10 < codes.count(9) < 30
    assert emu.requests["progress"] == 40


async def test__fail_rate__ends_tasks_with_status_3(start_legacy):
    url, _ = await start_legacy(fail_rate=1, fail_reason="GPU fell over")
    async with aiohttp.ClientSession(base_url=url, headers=AUTH) as http:
        data = await finished(http, (await submit(http, body_with()))["data"]["task_id"])
    assert (data["status"], data["failed_reason"], data["imgs"], data["progress"]) == (3, "GPU fell over", None, 1)


async def test__latency__delays_every_reply(start_legacy):
    url, emu = await start_legacy(latency=0.2)
    async with aiohttp.ClientSession(base_url=url, headers=AUTH) as http:
        started = time.monotonic()
        await poll(http, "x")
        assert time.monotonic() - started >= 0.2
        emu.settings.latency = 0
        started = time.monotonic()
        await poll(http, "x")
        assert time.monotonic() - started < 0.2


@pytest.mark.parametrize(("status", "fmt", "content_type"), [(410, "text", "text/plain"),
                                                              (404, "json", "application/json")])
async def test__gone__answers_as_a_removed_api(start_legacy, status, fmt, content_type):
    url, emu = await start_legacy()
    async with aiohttp.ClientSession(base_url=url, headers=AUTH) as http:
        reply = await submit(http, body_with())
        emu.settings.gone, emu.settings.gone_format = status, fmt
        for method, path in (("POST", "/v2/upscale"), ("GET", f"/v2/progress?task_id={reply['data']['task_id']}")):
            async with http.request(method, path, json=body_with()) as resp:
                assert (resp.status, resp.content_type) == (status, content_type)
                text = await resp.text()
            assert str(status) in text
            if fmt == "json":
                assert {"code", "msg", "data"} - set(json.loads(text))  # not V2's envelope
        emu.settings.gone = None
        assert (await poll(http, reply["data"]["task_id"]))["code"] == 0
    assert emu.requests["upscale"] == 2 and emu.requests["progress"] == 2


# ---- how it runs ----

def test__emulator_legacy_v2__serves_v2_to_a_legacy_client():
    port = free_port()
    with running("emulator", "--legacy-v2", "--port", str(port), "--queue-delay", "0", "--process-delay", "0.1",
                 port=port, env={"UPSCALE_PROXY_LEGACY_A1111_PROFILE": "v1.6", "UPSCALE_PROXY_LEGACY_API_KEYS": KEY}):
        client = LegacyClient(f"http://127.0.0.1:{port}", {"X-Omni-Key": KEY})
        data = client.upscale_and_wait({"image": B64(PNG(30, 22)), "upscaler_1": "R-ESRGAN 4x+",
                                        "upscaling_resize": 2})
        with urllib.request.urlopen(data["imgs"][0], timeout=10) as resp:
            assert decode(resp.read()).size == (56, 40)  # v1.6: a multiple of 8
        assert LegacyClient(f"http://127.0.0.1:{port}", {"X-Omni-Key": "other"}).call(
            "/v2/upscale", {"image": B64(PNG(8, 8))})["code"] == 4


def test__serve_emulate_v2__runs_the_legacy_v2_beside_the_proxy():
    port, v3_port, v2_port = free_port(), free_port(), free_port()
    with running("serve", "--emulate-v3", "--emulate-v2", "--port", str(port), "--emulator-port", str(v3_port),
                 "--legacy-port", str(v2_port), port=port) as proc:
        client = LegacyClient(f"http://127.0.0.1:{v2_port}", {"Authorization": f"Bearer {KEY}"})
        data = client.upscale_and_wait({"image": B64(PNG(16, 16)), "upscaler_1": "Lanczos", "upscaling_resize": 2})
        assert data["imgs"][0].startswith(f"http://127.0.0.1:{v2_port}/v2/images/")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as resp:
            assert resp.status == 200
    lines = [json.loads(line) for line in proc.output.splitlines()]
    assert any(line["event"] == "legacy V2 emulator listening" and line["url"] == f"http://127.0.0.1:{v2_port}"
               for line in lines)


async def test__create_app_with_emulate_v2__is_the_v2_upstream(aiohttp_client, emulator, tmp_path):
    """The embedded V2 starts before the proxy reads v2_upstream, on any free port, and a legacy
    client's call reaches it."""
    server, _ = emulator
    settings = Settings(upstream=str(server.make_url("")), emulate_v2=True, allow_route_header=True,
                        data_dir=tmp_path / "data")
    proxy = await aiohttp_client(create_app(settings, legacy=LegacySettings(port=0, queue_delay=0)))
    assert settings.v2_upstream.startswith("http://127.0.0.1:")
    async with proxy.post("/v2/upscale", json=body_with(), headers={**AUTH, "X-Upscale-Proxy-Route": "legacy"}) as resp:
        assert resp.headers["X-Upscale-Proxy-Served-By"] == "legacy" and (await resp.json())["code"] == 0


def test__emulate_v2_with_workers__is_refused_saying_why():
    proc = subprocess.run([sys.executable, "-m", "proxy", "serve", "--emulate-v2", "--workers", "2"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "--emulate-v2" in proc.stderr and "Traceback" not in proc.stderr


def test__bad_legacy_setting__stops_start_up_naming_it():
    proc = subprocess.run([sys.executable, "-m", "proxy", "emulator", "--legacy-v2"], capture_output=True, text=True,
                          env={**os.environ, "UPSCALE_PROXY_LEGACY_GONE": "500"}, timeout=30)
    assert proc.returncode == 2 and "UPSCALE_PROXY_LEGACY_GONE" in proc.stderr


def test__release_lines__are_the_oracles():
    from typing import get_args

    from proxy.emulator.a1111 import ReleaseLine

    assert list(get_args(ReleaseLine)) == list(RELEASES)
    assert LegacySettings().a1111_profile == "v1.3"  # the proxy's default profile
