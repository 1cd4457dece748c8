"""Every V2 code this proxy can answer, each reached through real servers on loopback."""

import pytest
from aiohttp import web

from proxy.app import create_app
from proxy.emulator.v3 import ERROR_STATUS
from proxy.errors import V2Code
from proxy.mappings import load
from proxy.settings import Settings
from proxy.translate.errors import to_v2_error
from proxy.v3.errors import V3BadReply, V3Error, V3StatusError, V3Timeout, V3Unreachable
from tests.helpers import AUTH, KEY, closed_port_url, upscale, v2_call
from tests.images import b64

OK = {"image": b64(), "upscaler_1": "R-ESRGAN 4x+ Anime6B", "resize_mode": 0, "upscaling_resize": 2}


def body(**changes) -> dict:
    return {**OK, **changes}


async def test__not_json__is_code_1(proxy):
    reply = await v2_call(proxy, "POST", "/v2/upscale", data=b"{not json", headers=AUTH)
    assert reply == {"code": 1, "msg": reply["msg"], "data": None}
    assert "not valid JSON" in reply["msg"]


@pytest.mark.parametrize(("raw", "field"), [
    (b"[1, 2]", "JSON object"),
    (b'{"upscaler_1": "R-ESRGAN 4x+"}', "image"),
    (b'{"image": 12}', "image"),
])
async def test__wrong_shape__is_code_1_naming_the_field(proxy, raw, field):
    reply = await v2_call(proxy, "POST", "/v2/upscale", data=raw, headers=AUTH)
    assert reply["code"] == 1 and field in reply["msg"]


@pytest.mark.parametrize(("changes", "field"), [
    ({"upscaling_resize": "2"}, "upscaling_resize"),
    ({"upscaling_crop": "yes"}, "upscaling_crop"),
    ({"resize_mode": "0"}, "resize_mode"),
    ({"upscaler_1": 4}, "upscaler_1"),
    ({"img_expire_ttl": 1.5}, "img_expire_ttl"),
])
async def test__wrong_type__is_code_1_naming_the_field(proxy, emulator, changes, field):
    reply = await upscale(proxy, body(**changes))
    assert reply["code"] == 1 and reply["msg"].startswith(field), reply
    assert emulator[1].requests["submit"] == 0


@pytest.mark.parametrize(("changes", "field"), [
    ({"upscaler_1": "Waifu2x"}, "upscaler_1"),
    ({"upscaler_2": "Waifu2x", "extras_upscaler_2_visibility": 0.5}, "upscaler_2"),
])
async def test__unknown_upscaler__is_code_2(proxy, emulator, changes, field):
    reply = await upscale(proxy, body(**changes))
    assert reply["code"] == 2 and reply["msg"].startswith(field)
    assert emulator[1].requests["submit"] == 0


async def test__unknown_upscaler_2_without_visibility__is_ignored(proxy):
    reply = await upscale(proxy, body(upscaler_2="Waifu2x", extras_upscaler_2_visibility=0))
    assert reply["code"] == 0


async def test__unknown_task__is_code_3(proxy):
    reply = await v2_call(proxy, "GET", "/v2/progress?task_id=0b9d5b0e-4c1e-4df1-a4c5-1f0d0f3d8a11")
    assert reply["code"] == 3 and "TASK_NOT_FOUND" in reply["msg"]


async def test__malformed_task_id__is_code_3_without_upstream_call(proxy, emulator):
    reply = await v2_call(proxy, "GET", "/v2/progress?task_id=../../etc/passwd")
    assert reply["code"] == 3
    assert emulator[1].requests["result"] == 0


async def test__missing_task_id__is_code_1(proxy):
    reply = await v2_call(proxy, "GET", "/v2/progress")
    assert reply["code"] == 1 and "task_id" in reply["msg"]


@pytest.mark.parametrize("path", ["/v2/upscale", "/v2/progress?task_id=abc"])
async def test__no_key__is_code_4_without_upstream_call(proxy, emulator, path):
    method = "POST" if "upscale" in path else "GET"
    reply = await v2_call(proxy, method, path, json=OK, headers={})
    assert reply["code"] == 4
    assert sum(emulator[1].requests.values()) == 0


async def test__key_refused_upstream__is_code_4(start_emulator, start_proxy):
    server, _ = await start_emulator(api_keys=["another-key"])
    client = await start_proxy(str(server.make_url("")))
    reply = await upscale(client, OK)
    assert reply["code"] == 4 and "INVALID_API_KEY" in reply["msg"]


async def test__upstream_unreachable__is_code_5_naming_no_address(start_proxy):
    url = closed_port_url()
    client = await start_proxy(url, upstream_retries=1)
    reply = await upscale(client, OK)
    assert reply["code"] == 5 and "unreachable" in reply["msg"]
    assert url.split("//")[1] not in reply["msg"] and "Cannot connect" not in reply["msg"]
    poll = await v2_call(client, "GET", "/v2/progress?task_id=abc")  # a poll rides through: still running
    assert (poll["code"], poll["data"]["status"]) == (0, 1), poll


@pytest.mark.parametrize(("changes", "words"), [
    ({"upscaling_resize": 0}, "upscaling_resize"),
    ({"upscaling_resize": -2}, "upscaling_resize"),
    ({"resize_mode": 3}, "resize_mode"),
    ({"extras_upscaler_2_visibility": 1.5}, "extras_upscaler_2_visibility"),
    ({"gfpgan_visibility": -0.1}, "gfpgan_visibility"),
    ({"img_expire_ttl": 604801}, "img_expire_ttl"),
    ({"image": "not base64 at all!"}, "not valid base64"),
    ({"image": "aGVsbG8gd29ybGQ="}, "not an image"),
    ({"image": ""}, "empty"),
    ({"image": b64(1100, 10), "upscaling_resize": 2}, "over the 2048 px"),
    ({"image": b64(2049, 4), "upscaling_resize": 0.5}, "2049x4"),
])
async def test__out_of_range__is_code_6_before_anything_goes_upstream(proxy, emulator, changes, words):
    reply = await upscale(proxy, body(**changes))
    assert reply["code"] == 6 and words in reply["msg"], reply
    assert emulator[1].requests["submit"] == 0


async def test__timeout__is_code_9(start_emulator, start_proxy):
    server, _ = await start_emulator(latency=2)
    client = await start_proxy(str(server.make_url("")), upstream_timeout=0.3)
    assert (await upscale(client, OK))["code"] == 9
    poll = await v2_call(client, "GET", "/v2/progress?task_id=abc")  # a poll rides through
    assert (poll["code"], poll["data"]["status"]) == (0, 1), poll


@pytest.mark.parametrize(("changes", "field"), [
    ({"resize_mode": 1, "upscaling_resize_w": 128, "upscaling_resize_h": 128}, "resize_mode"),
    ({"upscaler_1": "Lanczos"}, "upscaler_1"),
    ({"upscaler_1": "None"}, "upscaler_1"),
    ({"upscaling_resize": 6}, "upscaling_resize"),
    ({"upscaling_resize": 1}, "upscaling_resize"),
    ({"upscaler_2": "4x-UltraSharp", "extras_upscaler_2_visibility": 0.4}, "upscaler_2"),
    ({"gfpgan_visibility": 0.4}, "gfpgan_visibility"),
    ({"img_expire_ttl": 7200}, "img_expire_ttl"),
    ({"image": b64(fmt="PNG", mode="RGBA")}, "image"),
])
async def test__strict_policy__refuses_local_work_with_code_10_naming_the_field(
        emulator, start_proxy, changes, field):
    client = await start_proxy(str(emulator[0].make_url("")), policy="strict")
    reply = await upscale(client, body(**changes))
    assert reply["code"] == 10 and reply["msg"].startswith(field), reply
    assert emulator[1].requests["submit"] == 0


async def test__strict_model_policy__refuses_an_approximate_model_with_code_2(emulator, start_proxy):
    client = await start_proxy(str(emulator[0].make_url("")), policy_model="strict")
    reply = await upscale(client, body(upscaler_1="R-ESRGAN 4x+"))
    assert reply["code"] == 2 and "same-weights" in reply["msg"]
    assert (await upscale(client, OK))["code"] == 0  # Anime6B: the same weights


async def test__unknown_v2_endpoint_and_method__are_v2_bodies(proxy):
    assert (await v2_call(proxy, "GET", "/v2/txt2img"))["code"] == 10
    assert (await v2_call(proxy, "GET", "/v2/upscale"))["code"] == 10


@pytest.mark.filterwarnings("ignore:Sending a large body:ResourceWarning")  # the test client's
async def test__body_over_the_limit__is_code_6(emulator, start_proxy):
    client = await start_proxy(str(emulator[0].make_url("")), max_body_mb=1)
    reply = await upscale(client, body(image="A" * (2 * 1024 * 1024)))
    assert reply["code"] == 6 and "too large" in reply["msg"]


# --- V3 errors, every row of the table (spec section 6), injected by the emulator ---------------

TABLE = load()


@pytest.mark.parametrize("reason", sorted(ERROR_STATUS))
async def test__v3_error_reason__maps_to_its_v2_code(start_emulator, start_proxy, reason):
    server, emu = await start_emulator(error_reason=reason, error_endpoints=["submit"])
    client = await start_proxy(str(server.make_url("")))
    reply = await upscale(client, OK)
    assert reply["code"] == TABLE.errors.reasons[reason]
    assert reason in reply["msg"]
    assert emu.requests["submit"] == 1  # a POST is never re-sent


async def test__rate_limit__is_code_5_and_says_so(start_emulator, start_proxy):
    server, _ = await start_emulator(error_reason="RATE_LIMIT_EXCEEDED")
    client = await start_proxy(str(server.make_url("")))
    reply = await upscale(client, OK)
    assert reply["code"] == 5 and "rate limit" in reply["msg"]


async def test__bare_504_from_a_gateway__is_code_9(start_emulator, start_proxy):
    server, emu = await start_emulator(error_reason="GATEWAY_TIMEOUT")
    client = await start_proxy(str(server.make_url("")), upstream_retries=2)
    assert (await upscale(client, OK))["code"] == 9
    poll = await v2_call(client, "GET", "/v2/progress?task_id=abc")  # a poll rides through
    assert (poll["code"], poll["data"]["status"]) == (0, 1), poll
    assert emu.requests["result"] == 3  # a GET is retried on 5xx


async def test__transient_5xx_on_poll__is_retried_and_succeeds(start_emulator, start_proxy):
    server, emu = await start_emulator(error_reason="SERVICE_NOT_AVAILABLE", error_limit=2,
                                       error_endpoints=["result"])
    client = await start_proxy(str(server.make_url("")), upstream_retries=2)
    reply = await upscale(client, OK)
    poll = await v2_call(client, "GET", f"/v2/progress?task_id={reply['data']['task_id']}")
    assert poll["code"] == 0
    assert emu.requests["result"] == 3


async def test__unreadable_200_from_upstream__is_code_minus_1_and_ridden_through_by_a_poll(aiohttp_server, start_proxy,
                                                                                           log_lines):
    async def garbage(request):
        return web.Response(text="<html>an error page, sent with 200</html>", content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", garbage)
    client = await start_proxy(str((await aiohttp_server(app)).make_url("")))
    reply = await upscale(client, OK)
    assert reply == {"code": -1, "msg": "upstream sent a reply the proxy cannot read", "data": None}
    poll = await v2_call(client, "GET", "/v2/progress?task_id=abc")
    assert (poll["code"], poll["data"]["status"]) == (0, 1), poll
    submitted, polled = log_lines.requests()
    assert submitted["upstream_status"] == polled["upstream_status"] == 200
    assert polled["ride_through"] == "unseen" and "cannot be read" in polled["msg"]


# --- V3 error -> V2 error, at the edge: each kind of V3Error, by the table --------------------------

@pytest.mark.parametrize(("err", "code", "msg"), [
    (V3StatusError(403, "INVALID_API_KEY", "invalid api key"), 4, "upstream error: INVALID_API_KEY: invalid api key"),
    (V3StatusError(403, "SOMETHING_NEW", "x"), 4, "upstream error: SOMETHING_NEW: x"),  # by status
    (V3StatusError(418, "", ""), 1, "upstream error: HTTP 418"),  # the 4xx fallback
    (V3StatusError(599, "", ""), -1, "upstream error: HTTP 599"),  # the 5xx fallback
    (V3StatusError(429, "RATE_LIMIT_EXCEEDED", ""), 5,
     "upstream error: RATE_LIMIT_EXCEEDED (V3 rate limit reached (HTTP 429); V2 has no code for it, retry later)"),
    (V3Unreachable("could not connect to V3", sent=False), 5, "upstream unreachable: could not connect to V3"),
    (V3Timeout("V3 did not answer in time"), 9, "upstream did not answer in time"),
    (V3BadReply("V3 sent a reply that cannot be read"), -1, "upstream sent a reply the proxy cannot read"),
])
def test__v3_error__maps_to_a_v2_code_and_message(err: V3Error, code, msg):
    v2 = to_v2_error(err, TABLE.errors, KEY)
    assert (v2.code, v2.msg, v2.upstream_status) == (V2Code(code), msg, err.status)


def test__v3_error_echoing_the_key__is_redacted():
    v2 = to_v2_error(V3StatusError(403, "INVALID_API_KEY", f"key {KEY} is not valid"), TABLE.errors, KEY)
    assert v2.msg == "upstream error: INVALID_API_KEY: key [redacted] is not valid"


async def test__proxy_bug__is_code_minus_1_and_logged_with_traceback(aiohttp_client, log_lines, tmp_path):
    async def broken(request):
        raise RuntimeError("bug in a handler")

    app = create_app(Settings(upstream=closed_port_url(), data_dir=tmp_path))
    app.router.add_get("/v2/broken", broken)
    client = await aiohttp_client(app)
    reply = await v2_call(client, "GET", "/v2/broken")
    assert reply == {"code": -1, "msg": "internal error", "data": None}
    errors = [line for line in log_lines if line["event"] == "unexpected error"]
    assert "RuntimeError: bug in a handler" in errors[0]["exception"]
    assert KEY not in log_lines.text
