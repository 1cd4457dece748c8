"""The V3 emulator against the V3 contract: validation, errors, lifecycle, real images, expiry."""

import asyncio
import base64
import os

import aiohttp
import pytest

from tests.helpers import AUTH
from tests.images import b64, decode, encode, pattern


def v3_body(image: str | None = None, model="RealESRNet_x4plus", factor=2, image_type=None) -> dict:
    extra = {"response_image_type": image_type} if image_type else {}
    return {"extra": extra, "request": {"model_name": model, "image_base64": image or b64(), "scale_factor": factor}}


@pytest.fixture
async def v3(emulator):
    server, _ = emulator
    async with aiohttp.ClientSession(base_url=str(server.make_url("")), headers=AUTH) as http:
        yield http


async def submit(http, body, headers=None) -> tuple[int, dict]:
    async with http.post("/v3/async/upscale", json=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def result(http, task_id, headers=None) -> tuple[int, dict]:
    async with http.get("/v3/async/task-result", params={"task_id": task_id}, headers=headers) as resp:
        return resp.status, await resp.json()


async def finished(http, task_id) -> dict:
    for _ in range(200):
        status, doc = await result(http, task_id)
        assert status == 200
        if doc["task"]["status"] in ("TASK_STATUS_SUCCEED", "TASK_STATUS_FAILED"):
            return doc
        await asyncio.sleep(0.01)
    raise AssertionError("task never finished")


@pytest.mark.parametrize(("body", "status", "reason"), [
    (v3_body(model="RealESRGAN_x4plus"), 400, "INVALID_REQUEST_BODY"),
    (v3_body(factor=1), 400, "INVALID_REQUEST_BODY"),
    (v3_body(factor=4.01), 400, "INVALID_REQUEST_BODY"),
    (v3_body(image_type="gif"), 400, "INVALID_REQUEST_BODY"),
    (v3_body(image="@@@@"), 400, "INVALID_REQUEST_BODY"),
    (v3_body(image="data:image/png;base64," + b64()), 400, "INVALID_REQUEST_BODY"),
    (v3_body(image=base64.b64encode(b"plain text").decode()), 400, "INVALID_IMAGE_FORMAT"),
    (v3_body(image=b64(2049, 8)), 400, "IMAGE_EXCEEDS_MAX_RESOLUTION"),
    ({"request": {"model_name": "4x-UltraSharp"}}, 400, "INVALID_REQUEST_BODY"),
])
async def test__invalid_request__is_a_v3_error(v3, body, status, reason):
    code, doc = await submit(v3, body)
    assert (code, doc["reason"], doc["code"]) == (status, reason, status)
    assert set(doc) == {"code", "reason", "message", "metadata"}


@pytest.mark.filterwarnings("ignore:Sending a large body:ResourceWarning")
async def test__image_over_30_mb__is_refused(v3):
    code, doc = await submit(v3, v3_body(image=base64.b64encode(os.urandom(30 * 1024 * 1024 + 3)).decode()))
    assert (code, doc["reason"]) == (400, "IMAGE_FILE_EXCEEDS_MAX_SIZE")


async def test__scale_factor_4__is_accepted(v3):
    assert (await submit(v3, v3_body(factor=4)))[0] == 200


@pytest.mark.parametrize(("headers", "status", "reason"), [
    ({"Authorization": ""}, 400, "MISSING_API_KEY"),
    ({"Authorization": "Basic abc"}, 400, "MISSING_API_KEY"),
])
async def test__missing_key__is_refused(v3, headers, status, reason):
    code, doc = await submit(v3, v3_body(), headers=headers)
    assert (code, doc["reason"]) == (status, reason)
    code, doc = await result(v3, "x", headers=headers)
    assert (code, doc["reason"]) == (status, reason)


async def test__key_not_in_the_list__is_invalid(start_emulator):
    server, _ = await start_emulator(api_keys=["a", "b"])
    async with aiohttp.ClientSession(base_url=str(server.make_url(""))) as http:
        code, doc = await submit(http, v3_body(), headers={"Authorization": "Bearer c"})
        assert (code, doc["reason"]) == (403, "INVALID_API_KEY")
        assert (await submit(http, v3_body(), headers={"Authorization": "Bearer b"}))[0] == 200


async def test__unknown_task__is_404_task_not_found(v3):
    code, doc = await result(v3, "0b9d5b0e-4c1e-4df1-a4c5-1f0d0f3d8a11")
    assert (code, doc["reason"]) == (404, "TASK_NOT_FOUND")


@pytest.mark.parametrize(("model", "factor", "size", "expected"), [
    ("RealESRNet_x4plus", 2, (31, 17), (62, 34)),
    ("RealESRGAN_x4plus_anime_6B", 3.7, (31, 17), (114, 62)),
    ("4x-UltraSharp", 4, (5, 3), (20, 12)),
])
async def test__task__goes_queued_processing_succeed_with_a_real_upscale(v3, model, factor, size, expected):
    _, reply = await submit(v3, v3_body(b64(*size), model=model, factor=factor))
    statuses = []
    for _ in range(200):
        _, doc = await result(v3, reply["task_id"])
        if not statuses or statuses[-1] != doc["task"]["status"]:
            statuses.append(doc["task"]["status"])
        if doc["task"]["status"] == "TASK_STATUS_SUCCEED":
            break
        await asyncio.sleep(0.01)
    assert statuses == ["TASK_STATUS_QUEUED", "TASK_STATUS_PROCESSING", "TASK_STATUS_SUCCEED"]
    async with v3.get(doc["images"][0]["image_url"]) as resp:
        assert resp.status == 200 and resp.content_type == "image/png"
        image = decode(await resp.read())
    assert image.size == expected
    assert doc["images"][0]["image_url_ttl"] == 3600


async def test__same_input__gives_the_same_bytes_and_models_differ(v3):
    images = []
    for model in ("RealESRNet_x4plus", "RealESRNet_x4plus", "RealESRGAN_x4plus_anime_6B"):
        _, reply = await submit(v3, v3_body(b64(20, 20), model=model))
        doc = await finished(v3, reply["task_id"])
        async with v3.get(doc["images"][0]["image_url"]) as resp:
            images.append(await resp.read())
    assert images[0] == images[1]
    assert decode(images[0]).tobytes() != decode(images[2]).tobytes()


@pytest.mark.parametrize(("image_type", "fmt", "content_type"), [
    ("jpeg", "JPEG", "image/jpeg"), ("webp", "WEBP", "image/webp"), ("png", "PNG", "image/png")])
async def test__response_image_type__sets_the_format(v3, image_type, fmt, content_type):
    source = base64.b64encode(encode(pattern(12, 10, "RGBA"), "PNG")).decode()
    _, reply = await submit(v3, v3_body(source, image_type=image_type))
    doc = await finished(v3, reply["task_id"])
    assert doc["images"][0]["image_type"] == image_type
    async with v3.get(doc["images"][0]["image_url"]) as resp:
        assert resp.content_type == content_type
        assert decode(await resp.read()).format == fmt


async def test__image_url__stops_working_after_its_ttl(start_emulator):
    server, _ = await start_emulator(image_url_ttl=1, queue_delay=0, process_delay=0)
    async with aiohttp.ClientSession(base_url=str(server.make_url("")), headers=AUTH) as http:
        _, reply = await submit(http, v3_body())
        doc = await finished(http, reply["task_id"])
        url = doc["images"][0]["image_url"]
        assert doc["images"][0]["image_url_ttl"] == 1
        async with http.get(url) as resp:
            assert resp.status == 200
        await asyncio.sleep(1.2)
        async with http.get(url) as resp:
            assert resp.status == 403


async def test__fault_injection__limits_and_rates(start_emulator):
    server, emu = await start_emulator(error_reason="SERVICE_NOT_AVAILABLE", error_limit=1)
    async with aiohttp.ClientSession(base_url=str(server.make_url("")), headers=AUTH) as http:
        first, second = await submit(http, v3_body()), await submit(http, v3_body())
    assert (first[0], first[1]["reason"]) == (503, "SERVICE_NOT_AVAILABLE")
    assert second[0] == 200
    assert emu.requests["submit"] == 2


async def test__added_latency__delays_replies(start_emulator):
    server, _ = await start_emulator(latency=0.3)
    async with aiohttp.ClientSession(base_url=str(server.make_url("")), headers=AUTH) as http:
        with pytest.raises(TimeoutError):
            async with http.post("/v3/async/upscale", json=v3_body(),
                                 timeout=aiohttp.ClientTimeout(total=0.1)):
                pass
