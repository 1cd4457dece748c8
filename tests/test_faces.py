"""Face restoration on an A1111-compatible server: a fake one on loopback, with known stand-ins for
GFPGAN and CodeFormer, so that results are compared pixel for pixel."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from PIL import Image, ImageChops

from proxy.compose.faces import NO_FACES, A1111FaceRestorer, FaceRestorationError
from tests.fake_a1111 import (
    REQUESTS,
    codeformer_stand_in,
    create_fake_a1111,
    expected,
    gfpgan_stand_in,
)
from tests.helpers import closed_port_url
from tests.images import decode, encode, pattern

IMAGE = pattern(24, 16)
PNG = encode(IMAGE)

Start = Callable[..., Awaitable[tuple[str, list[dict]]]]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def start_fake(aiohttp_server) -> Start:
    """Start a fake A1111 on loopback, with the given faults. -> (base URL, the bodies it received)"""

    async def start(**faults) -> tuple[str, list[dict]]:
        app = create_fake_a1111(**faults)
        server = await aiohttp_server(app)
        return str(server.make_url("/")), app[REQUESTS]

    return start


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.mode == b.mode and a.size == b.size and ImageChops.difference(a, b).getbbox() is None


async def restore(session: aiohttp.ClientSession, url: str, g: float = 0.5, c: float = 0.5, w: float = 0.3,
                  timeout: float = 5.0) -> bytes:
    restorer = A1111FaceRestorer(session, url, timeout)
    return await restorer.restore(PNG, gfpgan_visibility=g, codeformer_visibility=c, codeformer_weight=w)


async def failure(session: aiohttp.ClientSession, url: str, **kw) -> str:
    with pytest.raises(FaceRestorationError) as caught:
        await restore(session, url, **kw)
    return str(caught.value)


async def test__a1111_restorer__sends_both_visibilities_and_no_upscaler(session, start_fake: Start):
    url, received = await start_fake()
    await restore(session, url, g=0.25, c=0.75, w=0.4)
    [body] = received
    assert decode(base64.b64decode(body.pop("image"))).tobytes() == IMAGE.tobytes()
    assert body == {
        "resize_mode": 0, "upscaling_resize": 1, "upscaler_1": "None", "upscaler_2": "None",
        "extras_upscaler_2_visibility": 0, "gfpgan_visibility": 0.25, "codeformer_visibility": 0.75,
        "codeformer_weight": 0.4, "show_extras_results": True,
    }


async def test__a1111_restorer__returns_the_servers_result_pixel_for_pixel(session, start_fake: Start):
    url, _ = await start_fake()
    result = decode(await restore(session, url, g=0.6, c=0.8, w=0.2))
    assert result.format == "PNG"
    assert same_pixels(result, expected(IMAGE, 0.6, 0.8, 0.2))


async def test__a1111_restorer__runs_gfpgan_before_codeformer(session, start_fake: Start):
    url, received = await start_fake()
    result = decode(await restore(session, url, g=1, c=1, w=0))
    assert len(received) == 1  # one call runs both, in the server's (V2's) order
    gfpgan_first = codeformer_stand_in(gfpgan_stand_in(IMAGE), 0)
    codeformer_first = gfpgan_stand_in(codeformer_stand_in(IMAGE, 0))
    assert not same_pixels(gfpgan_first, codeformer_first)  # values where the order shows
    assert same_pixels(result, gfpgan_first)


@pytest.mark.parametrize(("g", "c", "only"), [
    (0.7, 0, lambda im: Image.blend(im, gfpgan_stand_in(im), 0.7)),
    (0, 0.7, lambda im: Image.blend(im, codeformer_stand_in(im, 0.3), 0.7)),
], ids=["codeformer 0", "gfpgan 0"])
async def test__a1111_restorer__skips_a_model_at_visibility_0(session, start_fake: Start, g, c, only):
    url, _ = await start_fake()
    result = decode(await restore(session, url, g=g, c=c, w=0.3))
    assert same_pixels(result, only(IMAGE))


async def test__a1111_restorer__with_both_visibilities_0__returns_the_input_without_a_call(session, start_fake: Start):
    url, received = await start_fake()
    assert await restore(session, url, g=0, c=0) == PNG
    assert received == []


async def test__a1111_restorer__accepts_a_data_url(session, start_fake: Start):
    url, _ = await start_fake(data_url=True)
    assert same_pixels(decode(await restore(session, url)), expected(IMAGE, 0.5, 0.5, 0.3))


async def test__a1111_restorer__given_a_jpeg__returns_it_as_png(session, start_fake: Start):
    url, _ = await start_fake(fmt="JPEG")
    result = decode(await restore(session, url))
    assert (result.format, result.size) == ("PNG", IMAGE.size)


async def test__a1111_restorer__server_slower_than_timeout__raises_without_its_address(session, start_fake: Start):
    url, received = await start_fake(delay=1.0)
    message = await failure(session, url, timeout=0.1)
    assert message == "the face restorer did not answer in time"
    assert len(received) == 1


async def test__a1111_restorer__closed_port__raises_unreachable_without_its_address(session):
    url = closed_port_url()
    message = await failure(session, url)
    assert message == "the face restorer is unreachable"
    assert "127.0.0.1" not in message and url.rsplit(":", 1)[1] not in message


async def test__a1111_restorer__http_500__raises_with_the_status(session, start_fake: Start):
    url, _ = await start_fake(status=500)
    assert await failure(session, url) == "the face restorer answered HTTP 500"


@pytest.mark.parametrize(("reply", "message"), [
    ("not json", "the face restorer sent a reply that is not JSON"),
    ("no image", "the face restorer sent a reply without an image"),
    ("not an image", "the face restorer sent a reply that is not an image"),
    ("too large", f"the face restorer sent an image over {8192 * 8192} pixels"),
])
async def test__a1111_restorer__bad_reply__raises(session, start_fake: Start, reply, message):
    url, _ = await start_fake(reply=reply)
    assert await failure(session, url) == message


async def test__skip_faces__returns_its_input_unchanged():
    assert not NO_FACES.available
    assert await NO_FACES.restore(PNG, gfpgan_visibility=1, codeformer_visibility=1, codeformer_weight=0) == PNG
