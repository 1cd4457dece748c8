"""The three header forms legacy clients use; the key always goes upstream as a Bearer token."""

import pytest
from aiohttp import web

from tests.helpers import KEY, poll_until_done, upscale, v2_call
from tests.images import b64

BODY = {"image": b64(), "upscaler_1": "4x-UltraSharp", "upscaling_resize": 2}


@pytest.mark.parametrize("headers", [
    {"Authorization": f"Bearer {KEY}"},
    {"Authorization": f"bearer   {KEY}"},
    {"Authorization": KEY},
    {"X-Omni-Key": KEY},
])
async def test__each_header_form__is_forwarded_as_bearer(start_emulator, start_proxy, headers):
    # the emulator accepts only `Authorization: Bearer <KEY>`, and only this key
    server, emu = await start_emulator(api_keys=[KEY])
    client = await start_proxy(str(server.make_url("")))
    reply = await upscale(client, BODY, headers=headers)
    assert reply["code"] == 0, reply
    assert emu.tasks[reply["data"]["task_id"]].key == KEY
    data = await poll_until_done(client, reply["data"]["task_id"], headers=headers)
    assert data["status"] == 2


@pytest.mark.parametrize("headers", [{}, {"Authorization": ""}, {"Authorization": "Bearer "},
                                     {"X-Omni-Key": "  "}])
async def test__missing_key__is_code_4(proxy, headers):
    assert (await upscale(proxy, BODY, headers=headers))["code"] == 4


async def test__task_of_another_key__is_not_found(start_emulator, start_proxy):
    server, _ = await start_emulator(api_keys=[KEY, "sk-other"])
    client = await start_proxy(str(server.make_url("")))
    reply = await upscale(client, BODY)
    other = await v2_call(client, "GET", f"/v2/progress?task_id={reply['data']['task_id']}",
                          headers={"Authorization": "Bearer sk-other"})
    assert other["code"] == 3


async def test__key__is_never_logged(start_emulator, start_proxy, log_lines):
    server, _ = await start_emulator(api_keys=["sk-other"])
    client = await start_proxy(str(server.make_url("")))
    for headers in ({"Authorization": f"Bearer {KEY}"}, {"X-Omni-Key": KEY}):
        await upscale(client, BODY, headers=headers)  # refused upstream: code 4
        await v2_call(client, "GET", "/v2/progress?task_id=abc", headers=headers)
    assert len(log_lines.requests()) == 4
    assert KEY not in log_lines.text


async def test__upstream_message_echoing_the_key__is_redacted_in_msg_and_log(aiohttp_server, start_proxy,
                                                                              log_lines):
    async def refuse(request: web.Request) -> web.Response:  # an upstream that quotes the key back
        key = request.headers["Authorization"].removeprefix("Bearer ")
        return web.json_response({"code": 403, "reason": "INVALID_API_KEY", "message": f"key {key} is not valid",
                                  "metadata": {}}, status=403)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    client = await start_proxy(str((await aiohttp_server(app)).make_url("")))
    reply = await upscale(client, BODY)
    poll = await v2_call(client, "GET", "/v2/progress?task_id=abc")
    for said in (reply, poll):
        assert said["code"] == 4 and said["msg"] == "upstream error: INVALID_API_KEY: key [redacted] is not valid"
    assert [e["msg"] for e in log_lines.requests()] == [reply["msg"], poll["msg"]]
    assert KEY not in log_lines.text
