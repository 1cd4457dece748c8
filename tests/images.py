"""Real test images: small, deterministic, with structure (so resampling filters differ)."""

from __future__ import annotations

import base64
import io

from PIL import Image


def pattern(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """A gradient with a checkerboard on top: every pixel differs from its neighbours."""
    im = Image.new("RGB", (width, height))
    im.putdata([
        ((x * 255) // max(width - 1, 1), (y * 255) // max(height - 1, 1), 255 * ((x // 4 + y // 4) % 2))
        for y in range(height) for x in range(width)
    ])
    if mode == "RGBA":
        im.putalpha(Image.linear_gradient("L").resize((width, height)))
    elif mode == "P":
        im = im.quantize(64)
    return im


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def b64(width: int = 64, height: int = 48, fmt: str = "PNG", mode: str = "RGB") -> str:
    return base64.b64encode(encode(pattern(width, height, mode), fmt)).decode()


def decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im
