"""The direct path end to end: V2 submit -> one V3 job on the emulator -> V2 progress -> image."""

import asyncio
import base64
import json

import pytest

from tests.helpers import AUTH, CONTRACTS, poll_until_done, upscale
from tests.images import b64, decode, encode, pattern


async def download(client, url: str) -> bytes:
    async with client.session.get(url) as resp:
        assert resp.status == 200
        return await resp.read()


@pytest.mark.parametrize(("fmt", "factor", "size", "expected"), [
    ("PNG", 2, (64, 48), (128, 96)),
    ("JPEG", 4, (33, 17), (132, 68)),
    ("WEBP", 1.5, (51, 37), (76, 55)),
    ("PNG", 3.3, (10, 7), (33, 23)),
])
async def test__direct_round_trip__downloads_image_of_int_w_times_s(proxy, fmt, factor, size, expected):
    body = {"image": b64(*size, fmt=fmt), "upscaler_1": "R-ESRGAN 4x+ Anime6B",
            "resize_mode": 0, "upscaling_resize": factor}
    submitted = await upscale(proxy, body)
    assert submitted["code"] == 0, submitted
    assert submitted["data"]["warn"] == ""
    data = await poll_until_done(proxy, submitted["data"]["task_id"])
    assert data["status"] == 2
    assert data["progress"] == 1 and data["eta_relative"] == 0
    image = decode(await download(proxy, data["imgs"][0]))
    assert image.format == "PNG"  # the proxy always asks V3 for png
    assert image.size == expected


async def test__sdk_default_contract_body__goes_direct_with_approximation_warning(proxy):
    body = json.loads((CONTRACTS / "v2-upscale-request-sdk-default.json").read_text())
    body["image"] = b64(40, 30)
    reply = await upscale(proxy, body)
    assert reply["code"] == 0
    assert "RealESRNet_x4plus" in reply["data"]["warn"]
    data = await poll_until_done(proxy, reply["data"]["task_id"])
    assert decode(await download(proxy, data["imgs"][0])).size == (80, 60)


async def test__data_uri_and_null_fields__are_accepted(proxy):
    body = {"image": "data:image/png;base64," + b64(20, 10), "upscaler_1": None,
            "resize_mode": None, "upscaling_resize": None, "upscaling_crop": None,
            "upscaler_2": "R-ESRGAN 4x+", "extras_upscaler_2_visibility": None, "img_expire_ttl": None}
    reply = await upscale(proxy, body)
    assert reply["code"] == 0, reply
    data = await poll_until_done(proxy, reply["data"]["task_id"])
    assert decode(await download(proxy, data["imgs"][0])).size == (40, 20)  # SDK default factor 2


async def test__base64_with_line_breaks_and_no_padding__is_repaired(proxy):
    raw = encode(pattern(21, 13), "PNG")
    wrapped = base64.encodebytes(raw).decode().rstrip("=\n")
    reply = await upscale(proxy, {"image": wrapped, "upscaler_1": "4x-UltraSharp", "upscaling_resize": 2})
    assert reply["code"] == 0, reply
    data = await poll_until_done(proxy, reply["data"]["task_id"])
    assert decode(await download(proxy, data["imgs"][0])).size == (42, 26)


async def test__face_restoration_fields__are_skipped_with_a_warning(proxy):
    body = {"image": b64(), "upscaler_1": "4x-UltraSharp", "upscaling_resize": 2,
            "gfpgan_visibility": 0.5, "codeformer_visibility": 0.3, "codeformer_weight": 0.5}
    reply = await upscale(proxy, body)
    assert reply["code"] == 0
    assert "gfpgan_visibility ignored" in reply["data"]["warn"]
    assert "codeformer_visibility ignored" in reply["data"]["warn"]


async def test__v3_job__is_the_mapped_model_at_the_factor_with_png_output(proxy, emulator):
    _, emu = emulator
    reply = await upscale(proxy, {"image": b64(), "upscaler_1": "LDSR", "upscaling_resize": 2.5})
    task = emu.tasks[reply["data"]["task_id"]]  # the V2 task id is the V3 task id
    assert (task.model, task.factor, task.image_type) == ("RealESRNet_x4plus", 2.5, "png")
    assert "LDSR" in reply["data"]["warn"]


async def test__progress_while_running__reports_every_v2_field(start_emulator, start_proxy):
    server, _ = await start_emulator(queue_delay=0.3, process_delay=5)
    client = await start_proxy(str(server.make_url("")))
    reply = await upscale(client, {"image": b64(), "upscaling_resize": 2})
    async with client.get(f"/v2/progress?task_id={reply['data']['task_id']}", headers=AUTH) as resp:
        queued = (await resp.json())["data"]
    assert queued["status"] == 0 and queued["progress"] == 0 and queued["imgs"] is None
    assert queued["eta_relative"] > 0
    assert queued["submit_time"] and queued["execution_time"] == "" and queued["finish_time"] == ""
    assert set(queued["debug_info"]) == {"submit_time_ms", "execution_time_ms", "txt2img_time_ms", "finish_time_ms"}
    await asyncio.sleep(0.5)
    async with client.get(f"/v2/progress?task_id={reply['data']['task_id']}", headers=AUTH) as resp:
        running = (await resp.json())["data"]
    assert running["status"] == 1 and 0 < running["progress"] < 1 and running["eta_relative"] > 0
    assert running["execution_time"] != "" and running["failed_reason"] == ""


async def test__failed_v3_task__is_status_3_with_the_reason(start_emulator, start_proxy):
    server, _ = await start_emulator(fail_rate=1, fail_reason="image decode failed")
    client = await start_proxy(str(server.make_url("")))
    reply = await upscale(client, {"image": b64(), "upscaling_resize": 2})
    data = await poll_until_done(client, reply["data"]["task_id"])
    assert data["status"] == 3
    assert data["failed_reason"] == "image decode failed"
    assert data["imgs"] is None


async def test__every_request__is_one_log_line_with_code_status_and_latency(proxy, log_lines):
    reply = await upscale(proxy, {"image": b64(), "upscaling_resize": 2})
    await poll_until_done(proxy, reply["data"]["task_id"])
    lines = log_lines.requests()
    assert lines[0]["method"] == "POST" and lines[0]["path"] == "/v2/upscale"
    assert all({"v2_code", "latency_ms"} <= set(line) for line in lines)
    # every line that made a V3 call says what V3 answered (a poll the cache answered made none)
    assert all("upstream_status" in line for line in lines if line.get("poll_cache") not in ("hit", "shared"))
    assert {line["path"] for line in lines[1:]} == {"/v2/progress"}


@pytest.mark.parametrize("body", [
    # one SDK's own example: scale-by, with the scale-to fields zeroed
    {"resize_mode": 0, "upscaling_resize": 2, "upscaling_resize_w": 0, "upscaling_resize_h": 0,
     "upscaler_1": "4x-UltraSharp"},
    # another's: scale-to, with a scale-by factor and an empty second upscaler filled in
    {"resize_mode": 1, "upscaling_resize_w": 128, "upscaling_resize_h": 96, "upscaling_resize": 4,
     "upscaler_1": "4x-UltraSharp", "upscaler_2": "", "extras_upscaler_2_visibility": 0},
])
async def test__fields_the_mode_does_not_use__are_ignored_as_v2_did(proxy, body):
    reply = await upscale(proxy, {"image": b64(64, 48), **body})
    assert reply["code"] == 0, reply
    data = await poll_until_done(proxy, reply["data"]["task_id"])
    assert decode(await download(proxy, data["imgs"][0])).size == (128, 96)
