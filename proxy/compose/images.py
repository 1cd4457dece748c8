"""The local image work of a composed Plan: pure and synchronous, run in the composer's thread
pool, never on the event loop. What each step does is the step's own (`translate.steps`); this
module only feeds them the input and V3's outputs, in the Plan's order."""

from __future__ import annotations

import io

from PIL import Image

from proxy.translate.plan import Plan
from proxy.translate.steps import ImageTooLarge, ReadInput, decode

__all__ = ["ImageTooLarge", "compose", "encode_png", "v3_input_png"]


def encode_png(image: Image.Image, colour_key: tuple[int, int, int] | None = None) -> bytes:
    """PNG bytes with exactly the transparency asked for: Pillow would otherwise write whatever
    colour key is left in `image.info`, and V3 would treat those pixels as transparent."""
    buf = io.BytesIO()
    image.save(buf, "PNG", transparency=colour_key)
    return buf.getvalue()


def v3_input_png(source: bytes, read: ReadInput) -> bytes:
    """What a model gets: the input as the release read it, as RGB pixels and nothing else."""
    return encode_png(read.apply_bytes(source).convert("RGB"))


def compose(plan: Plan, source: bytes, outputs: list[bytes | None]) -> bytes:
    """The V2 result as PNG bytes, from the input and each branch's last V3 output (None: the
    branch had no V3 job). Face restoration, on another server, comes after."""
    original = plan.read.apply_bytes(source)
    results = []
    for branch, output in zip(plan.branches, outputs, strict=True):
        start = decode(output).convert("RGB") if output is not None else original  # models give RGB
        results.append(branch.apply(start))
    if not results:  # upscaler None
        result = original
    elif plan.blend:
        result = plan.blend.apply(*results)
    else:
        result = results[0]
    key = original.info.get("transparency")
    keep = plan.keep_colour_key and result.mode == "RGB" and isinstance(key, tuple)
    return encode_png(result, key if keep else None)
