"""The local image work, exactly as AUTOMATIC1111's extras did it (spec section 7). Pure and
synchronous: it runs in the composer's own thread pool, never on the event loop."""

from __future__ import annotations

import io
import warnings

from PIL import Image

from proxy.compose.faces import NO_FACES, FaceRestorer
from proxy.translate.plan import MAX_PIXELS, Plan

FILTERS = {"LANCZOS": Image.Resampling.LANCZOS, "NEAREST": Image.Resampling.NEAREST}


class ImageTooLarge(ValueError):
    pass


def decode_rgb(data: bytes) -> Image.Image:
    """Decode with a pixel bound checked before any pixel is read (no decompression bombs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ImageTooLarge(f"{im.width}x{im.height} is over {MAX_PIXELS} pixels")
            return im.convert("RGB")  # V2 dropped alpha: convert, never composite


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def rgb_png(data: bytes) -> bytes:
    """The input as V2 saw it (RGB, alpha dropped), for V3."""
    return encode_png(decode_rgb(data))


def finish_branch(image: Image.Image, size: tuple[int, int], local_filter: str | None, factor_up: bool) -> Image.Image:
    """One upscaler's output at the exact size: a local upscaler's one resize, or the LANCZOS
    resize after V3's passes; nothing when the size is already right."""
    if image.size == size:
        return image
    if local_filter and factor_up:
        return image.resize(size, FILTERS[local_filter])
    return image.resize(size, Image.Resampling.LANCZOS)


def centre_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    canvas = Image.new("RGB", size)
    canvas.paste(image, (size[0] // 2 - image.width // 2, size[1] // 2 - image.height // 2))
    return canvas


def compose(plan: Plan, source: bytes, passes: list[bytes | None],
            faces: FaceRestorer = NO_FACES) -> bytes:
    """The V2 result as PNG bytes, from the input and each branch's last V3 pass (None: local)."""
    original = decode_rgb(source)
    result = _upscaled(plan, original, passes)
    for step in plan.faces:
        result = faces.restore(result, step.model, step.visibility, step.weight)
    return encode_png(result)


def _upscaled(plan: Plan, original: Image.Image, passes: list[bytes | None]) -> Image.Image:
    if not plan.branches:  # upscaler None: the input, in RGB
        return original
    factor_up = plan.scaled[0] > original.width or plan.scaled[1] > original.height
    outputs = []
    for branch, upscaled in zip(plan.branches, passes, strict=True):
        start = decode_rgb(upscaled) if upscaled is not None else original
        image = finish_branch(start, plan.scaled, branch.filter, factor_up)
        outputs.append(centre_crop(image, plan.crop) if plan.crop else image)
    if len(outputs) == 2:
        return Image.blend(outputs[0], outputs[1], plan.blend)
    return outputs[0]
