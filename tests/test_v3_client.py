"""The V3 client raises V3's own errors, and only those, with messages fit for a client: real
upstreams on loopback (the emulator with faults injected, a closed port, a server that hangs up)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from proxy.v3.client import V3Client
from proxy.v3.errors import V3BadReply, V3Error, V3StatusError, V3Timeout, V3Unreachable
from proxy.v3.payload import UpscaleBody
from tests.helpers import KEY, closed_port_url
from tests.images import b64

MakeClient = Callable[..., Awaitable[V3Client]]


def body() -> UpscaleBody:
    return UpscaleBody("4x-UltraSharp", 2, b64().encode())


@pytest.fixture
async def v3() -> AsyncIterator[MakeClient]:
    """A V3 client of `base_url`, on its own session, closed after the test."""
    sessions: list[aiohttp.ClientSession] = []

    async def make(base_url: str, *, timeout: float = 5, retries: int = 0) -> V3Client:
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))
        sessions.append(session)
        return V3Client(session, base_url, retries=retries, backoff=0.001)

    yield make
    for session in sessions:
        await session.close()


def calls(client: V3Client) -> tuple[Callable[[], Awaitable[object]], ...]:
    """Both public calls, unstarted."""
    return (lambda: client.submit(body(), KEY)), (lambda: client.task_result("abc", KEY))


def assert_client_safe(e: V3Error, base_url: str) -> None:
    """What a V2 client may be shown: no upstream address, no aiohttp wording."""
    text = str(e)
    assert base_url.split("//")[1] not in text and "127.0.0.1" not in text
    assert "Cannot connect" not in text and "aiohttp" not in text and "Client" not in text


async def test__healthy_upstream__submit_and_result_return_status_200(start_emulator, v3):
    server, _ = await start_emulator()
    client = await v3(str(server.make_url("")))
    task_id, status = await client.submit(body(), KEY)
    result, again = await client.task_result(task_id, KEY)
    assert status == again == 200 and result.task.task_id == task_id


@pytest.mark.parametrize(("reason", "status"), [("INVALID_API_KEY", 403), ("RATE_LIMIT_EXCEEDED", 429),
                                                ("SERVICE_NOT_AVAILABLE", 503)])
async def test__v3_error_reply__raises_status_error_with_its_reason_and_message(start_emulator, v3, reason, status):
    server, emu = await start_emulator(error_reason=reason)
    client = await v3(str(server.make_url("")), retries=2)
    with pytest.raises(V3StatusError) as e:
        await client.submit(body(), KEY)
    assert (e.value.status, e.value.reason, e.value.message) == (status, reason, "injected by the emulator")
    assert emu.requests["submit"] == 1  # a POST is never re-sent


async def test__gateway_504_page__raises_status_error_with_empty_reason_and_message(start_emulator, v3):
    server, emu = await start_emulator(error_reason="GATEWAY_TIMEOUT")
    client = await v3(str(server.make_url("")), retries=2)
    with pytest.raises(V3StatusError) as e:
        await client.task_result("abc", KEY)
    assert (e.value.status, e.value.reason, e.value.message) == (504, "", "")
    assert emu.requests["result"] == 3  # a GET is retried on 5xx


async def test__closed_port__raises_unreachable_naming_no_address(v3):
    url = closed_port_url()
    client = await v3(url, retries=1)
    for call in calls(client):
        with pytest.raises(V3Unreachable) as e:
            await call()
        assert e.value.sent is False and e.value.status is None
        assert_client_safe(e.value, url)
        assert isinstance(e.value.__cause__, aiohttp.ClientConnectorError)  # the detail, for the log


@pytest.fixture
async def hang_up() -> AsyncIterator[tuple[str, list[int]]]:
    """An upstream that accepts each connection, reads a little and closes it without a reply."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        await reader.read(64)
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", connections
    server.close()
    await server.wait_closed()


async def test__connection_broken__raises_unreachable_and_a_post_is_not_resent(hang_up, v3):
    url, connections = hang_up
    client = await v3(url, retries=2)
    with pytest.raises(V3Unreachable) as e:
        await client.submit(body(), KEY)
    assert e.value.sent is True and len(connections) == 1
    assert_client_safe(e.value, url)
    with pytest.raises(V3Unreachable):
        await client.task_result("abc", KEY)
    assert len(connections) >= 1 + 3  # a GET is retried (aiohttp may add a retry of its own)


async def test__slow_upstream__raises_timeout(start_emulator, v3):
    server, _ = await start_emulator(latency=2)
    url = str(server.make_url(""))
    client = await v3(url, timeout=0.2, retries=2)
    for call in calls(client):
        with pytest.raises(V3Timeout) as e:
            await call()
        assert_client_safe(e.value, url)


@pytest.mark.parametrize("reply", [b"<html>hello</html>", b'{"task_id": ""}', b"{}"])
async def test__unreadable_200__raises_bad_reply(aiohttp_server, v3, reply):
    async def garbage(request: web.Request) -> web.Response:
        return web.Response(body=reply, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", garbage)
    server = await aiohttp_server(app)
    client = await v3(str(server.make_url("")))
    for call in calls(client):
        with pytest.raises(V3BadReply) as e:
            await call()
        assert e.value.status == 200


@pytest.mark.parametrize(("raw", "reason", "message"), [
    (b'{"code": 403, "reason": "INVALID_API_KEY", "message": "invalid api key", "metadata": {}}',
     "INVALID_API_KEY", "invalid api key"),
    (b'{"reason": "SOMETHING_NEW"}', "SOMETHING_NEW", ""),
    (b'{"code": "odd", "reason": "TASK_NOT_FOUND", "message": 12}', "TASK_NOT_FOUND", ""),
    (b'{"reason": null, "message": "only a message"}', "", "only a message"),
    (b"<html>502 Bad Gateway</html>", "", ""),
    (b'["a", "list"]', "", ""),
    (b"", "", ""),
])
def test__error_body__is_read_liberally(raw, reason, message):
    err = V3StatusError.from_reply(418, raw)
    assert (err.status, err.reason, err.message) == (418, reason, message)
