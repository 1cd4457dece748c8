"""The local image work of a composed Plan: pure and synchronous, run in the composer's thread
pool, never on the event loop. What each step does is the step's own (`translate.steps`); this
module only feeds them the input and V3's outputs, in the Plan's order."""

from __future__ import annotations

import io

from PIL import Image

from proxy.translate.plan import Plan
from proxy.translate.steps import ImageTooLarge, ReadInput, decode

__all__ = ["ImageTooLarge", "compose", "encode_png", "v3_input_png"]

# What V3 gets is uploaded once and never stored: zlib level 1 encodes a 2048 x 2048 photo in a
# quarter of level 6's time, for 17% more bytes (tests/bench/pillow.py).
V3_INPUT_LEVEL = 1
PNG_LEVEL = 4  # the composed result's, unless told (UPSCALE_PROXY_PNG_COMPRESS_LEVEL)


def encode_png(image: Image.Image, colour_key: tuple[int, int, int] | None = None,
               compress_level: int = PNG_LEVEL) -> bytes:
    """PNG bytes with exactly the transparency asked for: Pillow would otherwise write whatever
    colour key is left in `image.info`, and V3 would treat those pixels as transparent."""
    buf = io.BytesIO()
    image.save(buf, "PNG", transparency=colour_key, compress_level=compress_level)
    return buf.getvalue()


def _rgb(image: Image.Image) -> Image.Image:
    # convert() to the same mode is a full copy: 20 MB and ~10 ms for a 2080 x 2400 V3 output
    return image if image.mode == "RGB" else image.convert("RGB")


def v3_input_png(source: bytes, read: ReadInput) -> bytes:
    """What a model gets: the input as the release read it, as RGB pixels and nothing else."""
    return encode_png(_rgb(read.apply_bytes(source)), None, V3_INPUT_LEVEL)


def compose(plan: Plan, source: bytes, outputs: list[bytes | None], compress_level: int = PNG_LEVEL) -> bytes:
    """The V2 result as PNG bytes, from the input and each branch's last V3 output (None: the
    branch had no V3 job), at zlib level `compress_level`. Face restoration, on another server,
    comes after."""
    original = plan.read.apply_bytes(source)  # also when unused: an input V2 could not read fails here too
    key = original.info.get("transparency")
    # No name holds a decoded output or a step's intermediate: each is freed as soon as the next
    # step has made its own, so one composition holds at most a finished result, plus the image
    # being decoded or resized (tests/bench/pillow.py measures the peak).
    results = [branch.apply(_rgb(decode(output)) if output is not None else original)  # models give RGB
               for branch, output in zip(plan.branches, outputs, strict=True)]
    if not results:  # upscaler None
        result = original
    elif plan.blend:
        result = plan.blend.apply(*results)
    else:
        result = results[0]
    del original, results  # the encoder needs the result only
    keep = plan.keep_colour_key and result.mode == "RGB" and isinstance(key, tuple)
    return encode_png(result, key if keep else None, compress_level)
