"""Face restoration (GFPGAN, CodeFormer): V2 ran it after the upscale; V3 has no successor.

Operators with a GPU box can run it on an AUTOMATIC1111-compatible server (AUTOMATIC1111, Forge,
SD.Next): one extras call with both visibilities set runs GFPGAN then CodeFormer, in V2's order.
Without one the step is skipped (the Plan warns the client, or refuses under the strict policy).
"""

from __future__ import annotations

import asyncio
import io
import warnings
from typing import Protocol

import aiohttp
import orjson
import pybase64
from PIL import Image

from proxy.translate.steps import MAX_PIXELS

# what A1111 encodes API images as (its samples_format); nothing else reaches Pillow's decoders
REPLY_FORMATS = ("PNG", "JPEG", "WEBP")


class FaceRestorationError(Exception):
    """Why the step failed, in words safe to show a client: no address, no library wording."""


class FaceRestorer(Protocol):
    available: bool

    async def restore(self, png: bytes, *, gfpgan_visibility: float, codeformer_visibility: float,
                      codeformer_weight: float) -> bytes:
        """The PNG with faces restored: GFPGAN then CodeFormer, each blended with its input by its
        visibility and skipped at 0, as V2 did."""


class SkipFaces:
    """No face restorer is configured: the step is skipped."""

    available = False

    async def restore(self, png: bytes, *, gfpgan_visibility: float, codeformer_visibility: float,
                      codeformer_weight: float) -> bytes:
        return png


NO_FACES = SkipFaces()


class A1111FaceRestorer:
    """POST /sdapi/v1/extra-single-image with no upscaler: only the face restorers run."""

    available = True

    def __init__(self, session: aiohttp.ClientSession, base_url: str, timeout: float) -> None:
        self._session = session
        self._url = base_url.rstrip("/") + "/sdapi/v1/extra-single-image"
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def restore(self, png: bytes, *, gfpgan_visibility: float, codeformer_visibility: float,
                      codeformer_weight: float) -> bytes:
        if not gfpgan_visibility and not codeformer_visibility:
            return png  # both skipped: no round trip to a GPU
        body = {
            "image": pybase64.b64encode(png).decode("ascii"),
            "resize_mode": 0, "upscaling_resize": 1, "upscaler_1": "None", "upscaler_2": "None",
            "extras_upscaler_2_visibility": 0,
            "gfpgan_visibility": gfpgan_visibility,
            "codeformer_visibility": codeformer_visibility,
            "codeformer_weight": codeformer_weight,
            "show_extras_results": True,
        }
        try:
            async with self._session.post(self._url, data=orjson.dumps(body), timeout=self._timeout,
                                          allow_redirects=False,
                                          headers={"Content-Type": "application/json"}) as resp:
                if resp.status != 200:
                    raise FaceRestorationError(f"the face restorer answered HTTP {resp.status}")
                reply = await resp.read()
        except TimeoutError as e:  # before ClientError: aiohttp's read timeouts are both
            raise FaceRestorationError("the face restorer did not answer in time") from e
        except aiohttp.ClientConnectorError as e:
            raise FaceRestorationError("the face restorer is unreachable") from e
        except aiohttp.ClientError as e:
            raise FaceRestorationError("the face restorer broke off its reply") from e
        # decoding a large image takes a while: off the event loop
        return await asyncio.to_thread(_reply_png, reply)


def _reply_png(reply: bytes) -> bytes:
    try:
        doc = orjson.loads(reply)
    except orjson.JSONDecodeError as e:
        raise FaceRestorationError("the face restorer sent a reply that is not JSON") from e
    value = doc.get("image") if isinstance(doc, dict) else None
    if not isinstance(value, str):
        raise FaceRestorationError("the face restorer sent a reply without an image")
    if value.startswith("data:"):  # A1111 takes data URLs as input: take them back too
        value = value.partition(",")[2]
    try:
        data = pybase64.b64decode(value, validate=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=REPLY_FORMATS) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise FaceRestorationError(f"the face restorer sent an image over {MAX_PIXELS} pixels")
                im.load()
                if im.format == "PNG":
                    return data
                buf = io.BytesIO()
                im.save(buf, "PNG")
                return buf.getvalue()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise FaceRestorationError("the face restorer sent a reply that is not an image") from e
