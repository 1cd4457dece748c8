"""A fake AUTOMATIC1111 server: POST /sdapi/v1/extra-single-image with known stand-ins for the face
models, so that tests can compare pixels, and the faults a real server shows."""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Literal

from aiohttp import web
from PIL import Image

# the stand-ins ship with the legacy V2 emulator, which restores faces the same way
from proxy.emulator.a1111 import codeformer_stand_in, gfpgan_stand_in

REQUESTS = web.AppKey("requests", list[dict])

Reply = Literal["image", "not json", "no image", "not an image", "too large"]


def expected(image: Image.Image, g: float, c: float, w: float) -> Image.Image:
    """What A1111's extras do with no upscaler: RGB, GFPGAN then CodeFormer, each blended, 0 skips."""
    image = image.convert("RGB")
    if g > 0:
        image = Image.blend(image, gfpgan_stand_in(image), g)
    if c > 0:
        image = Image.blend(image, codeformer_stand_in(image, w), c)
    return image


def create_fake_a1111(*, status: int = 200, delay: float = 0.0, reply: Reply = "image",
                      fmt: str = "PNG", data_url: bool = False) -> web.Application:
    """`status`, `delay` (seconds before answering) and `reply` are faults; `fmt` and `data_url`
    are how forks encode the image they send back."""

    async def extra_single_image(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        request.app[REQUESTS].append(body)
        if delay:
            await asyncio.sleep(delay)
        if status != 200:
            return web.json_response({"detail": "fake failure"}, status=status)
        if reply == "not json":
            return web.Response(text="<html>Internal Server Error</html>", content_type="text/html")
        if reply == "no image":
            return web.json_response({"html_info": ""})
        if reply == "not an image":
            return web.json_response({"image": base64.b64encode(b"GIF89a but not really").decode(), "html_info": ""})
        if reply == "too large":  # one row over 8192*8192 pixels; 1 bit deep, so a small PNG
            result = Image.new("1", (8192, 8193))
        else:
            source = Image.open(io.BytesIO(base64.b64decode(body["image"])))
            result = expected(source, body["gfpgan_visibility"], body["codeformer_visibility"],
                              body["codeformer_weight"])
        buf = io.BytesIO()
        result.save(buf, fmt)
        image = base64.b64encode(buf.getvalue()).decode()
        prefix = f"data:image/{fmt.lower()};base64," if data_url else ""
        return web.json_response({"image": prefix + image, "html_info": "<p>fake</p>"})

    app = web.Application()
    app[REQUESTS] = []
    app.router.add_post("/sdapi/v1/extra-single-image", extra_single_image)
    return app
