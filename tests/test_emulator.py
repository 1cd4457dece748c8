"""The V3 emulator against the V3 contract: validation, errors, lifecycle, real images, expiry,
webhooks."""

import asyncio
import base64
import os

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import unused_port

from tests.helpers import AUTH
from tests.images import b64, decode, encode, pattern


def v3_body(image: str | None = None, model="RealESRNet_x4plus", factor=2, image_type=None,
            webhook: str | None = None) -> dict:
    extra = {"response_image_type": image_type} if image_type else {}
    if webhook:
        extra["webhook"] = {"url": webhook}
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
    (v3_body(model="weights V3 lacks"), 400, "INVALID_REQUEST_BODY"),  # the legacy V2's filter, not V3's
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


class Receiver:
    """A webhook endpoint: records (content type, event) per call, answers `statuses` in turn
    (the last one from then on)."""

    def __init__(self, statuses: tuple[int, ...]) -> None:
        self.statuses = statuses
        self.events: list[tuple[str, dict]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.events.append((request.content_type, await request.json()))
        return web.Response(status=self.statuses[min(len(self.events), len(self.statuses)) - 1])


@pytest.fixture
def start_receiver(aiohttp_server):
    async def start(*statuses: int) -> tuple[str, Receiver]:
        receiver = Receiver(statuses or (204,))
        app = web.Application()
        app.router.add_post("/hook", receiver.handle)
        server = await aiohttp_server(app)
        return str(server.make_url("/hook")), receiver

    return start


async def until(check, what: str) -> None:
    for _ in range(300):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never {what}")


async def delivered(emu) -> None:
    await until(lambda: not emu.deliveries, "done with webhooks")


async def test__webhook__posts_the_task_result_once_without_a_poll(start_emulator, start_receiver):
    url, receiver = await start_receiver()
    server, emu = await start_emulator(webhook_retry_delay=0.01)
    async with aiohttp.ClientSession(base_url=str(server.make_url("")), headers=AUTH) as http:
        _, reply = await submit(http, v3_body(webhook=url))
        await delivered(emu)
        assert emu.requests["result"] == 0  # the task settled on its own
        assert len(receiver.events) == 1
        content_type, event = receiver.events[0]
        assert content_type == "application/json"
        assert set(event) == {"event_type", "payload"} and event["event_type"] == "ASYNC_TASK_RESULT"
        assert event["payload"]["task"]["task_id"] == reply["task_id"]
        assert event["payload"]["task"]["status"] == "TASK_STATUS_SUCCEED"
        assert event["payload"] == (await result(http, reply["task_id"]))[1]
        async with http.get(event["payload"]["images"][0]["image_url"]) as resp:
            assert resp.status == 200
    assert (emu.requests["webhook"], emu.webhook_calls) == (1, [(url, 204)])


async def test__webhook__of_a_failed_task__carries_the_failure(start_emulator, start_receiver):
    url, receiver = await start_receiver()
    server, emu = await start_emulator(fail_rate=1, fail_reason="boom")
    async with aiohttp.ClientSession(base_url=str(server.make_url("")), headers=AUTH) as http:
        _, reply = await submit(http, v3_body(webhook=url))
        await delivered(emu)
        [(_, event)] = receiver.events
        assert event["payload"]["task"] | {"task_id": None} == {
            "task_id": None, "task_type": "UPSCALE", "status": "TASK_STATUS_FAILED",
            "reason": "boom", "eta": 0, "progress_percent": 0}
        assert event["payload"]["images"] == []
        assert event["payload"] == (await result(http, reply["task_id"]))[1]


async def test__webhook__is_retried_until_a_2xx(start_emulator, start_receiver):
    url, receiver = await start_receiver(500, 500, 204)
    server, emu = await start_emulator(webhook_retry_delay=0.01)
    async with aiohttp.ClientSession(base_url=str(server.make_url("")), headers=AUTH) as http:
        await submit(http, v3_body(webhook=url))
        await delivered(emu)
    assert [outcome for _, outcome in emu.webhook_calls] == [500, 500, 204]
    assert emu.requests["webhook"] == len(receiver.events) == 3
    assert receiver.events[0] == receiver.events[1] == receiver.events[2]


@pytest.mark.parametrize("listening", [True, False], ids=["always-500", "nobody-listening"])
async def test__webhook__gives_up_after_5_retries(start_emulator, start_receiver, listening):
    url, receiver = await start_receiver(500)
    if not listening:
        url = f"http://127.0.0.1:{unused_port()}/hook"
    server, emu = await start_emulator(webhook_retry_delay=0.01)
    async with aiohttp.ClientSession(base_url=str(server.make_url("")), headers=AUTH) as http:
        await submit(http, v3_body(webhook=url))
        await delivered(emu)
    assert emu.requests["webhook"] == len(emu.webhook_calls) == 6
    assert len(receiver.events) == (6 if listening else 0)
    assert all(isinstance(outcome, int if listening else str) for _, outcome in emu.webhook_calls)


async def test__webhooks_off__delivers_nothing(start_emulator, start_receiver):
    url, receiver = await start_receiver()
    server, emu = await start_emulator(webhooks=False)
    async with aiohttp.ClientSession(base_url=str(server.make_url("")), headers=AUTH) as http:
        code, reply = await submit(http, v3_body(webhook=url))
        assert code == 200
        assert (await finished(http, reply["task_id"]))["task"]["status"] == "TASK_STATUS_SUCCEED"
    await asyncio.sleep(0.05)
    assert (receiver.events, emu.requests["webhook"], emu.deliveries) == ([], 0, set())


@pytest.mark.parametrize("webhook", [
    {"url": "ftp://127.0.0.1/hook"}, {"url": "file:///tmp/hook"}, {"url": "not a url"}, {}])
async def test__webhook_that_is_not_an_http_url__is_refused(v3, webhook):
    body = v3_body()
    body["extra"]["webhook"] = webhook
    code, doc = await submit(v3, body)
    assert (code, doc["reason"]) == (400, "INVALID_REQUEST_BODY")
    assert "extra.webhook" in doc["message"]


async def test__webhook__unknown_extra_keys__are_still_accepted(v3):
    body = v3_body(webhook="https://example.invalid/hook")
    body["extra"]["webhook"]["test_mode"] = {"enabled": True}
    body["extra"]["something_new"] = 1
    assert (await submit(v3, body))[0] == 200


@pytest.mark.parametrize("pending", ["before-completion", "between-retries"])
async def test__emulator__shuts_down_cleanly_with_a_delivery_pending(start_emulator, start_receiver, pending):
    url, receiver = await start_receiver(500)
    delays = {"process_delay": 30} if pending == "before-completion" else {"webhook_retry_delay": 30}
    server, emu = await start_emulator(**delays)
    async with aiohttp.ClientSession(base_url=str(server.make_url("")), headers=AUTH) as http:
        await submit(http, v3_body(webhook=url))
    [job] = emu.deliveries
    if pending == "between-retries":
        await until(lambda: emu.webhook_calls, "called the webhook")
    await asyncio.sleep(0.02)
    await server.close()
    assert job.cancelled() and not emu.deliveries and emu.http is None
    assert len(receiver.events) == len(emu.webhook_calls) == (1 if pending == "between-retries" else 0)
