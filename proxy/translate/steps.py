"""The steps of a Plan: each one says what it does (for the preview and the guide) and does it
(for the composer), so that the description and the pixels come from one place.

Steps are pydantic models, so a Plan is stored and read back as JSON without hand-written code.
`apply` is pure Pillow work on an image: no I/O, no clock; the composer runs it in its executor.
"""

from __future__ import annotations

import io
import warnings
from typing import Annotated, Literal

from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

Size = tuple[int, int]
MAX_PIXELS = 8192 * 8192  # any image the proxy decodes or makes on the way (4 x 2048 per side)
FILTERS = {"LANCZOS": Image.Resampling.LANCZOS, "NEAREST": Image.Resampling.NEAREST}


class ImageTooLarge(ValueError):
    pass


class _Step(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _size(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


class ReadInput(_Step):
    """The input as the A1111 release read it (spec 7.2, colour column)."""

    kind: Literal["read"] = "read"
    keep_rgba: bool = False  # v1.9+: RGB and RGBA kept, PNG transparency fixed; before: RGB
    exif_orientation: bool = False  # v1.9+: the EXIF orientation applied

    def describe(self) -> str:
        if not self.keep_rgba:
            return "read the input as RGB (alpha and transparency dropped, as V2 did)"
        turn = "with its EXIF orientation applied, " if self.exif_orientation else ""
        return f"read the input {turn}keeping RGB or RGBA (a PNG transparency key becomes alpha)"

    def apply_bytes(self, data: bytes) -> Image.Image:
        image = decode(data)
        if self.keep_rgba:
            if self.exif_orientation:
                image = ImageOps.exif_transpose(image)
            if image.mode in ("RGB", "P") and isinstance(image.info.get("transparency"), bytes):
                image = image.convert("RGBA")  # images.fix_png_transparency
            return image if image.mode in ("RGB", "RGBA") else _to_rgb(image)
        return _to_rgb(image)


class V3Job(_Step):
    """One V3 upscale job; in a chain, each job takes the previous job's output."""

    kind: Literal["v3"] = "v3"
    model: str
    scale_factor: float
    size_in: Size
    size_out: Size

    def describe(self) -> str:
        return (f"V3 job: {self.model} at scale_factor {self.scale_factor:g}, "
                f"{_size(self.size_in)} -> {_size(self.size_out)}")


class Resize(_Step):
    kind: Literal["resize"] = "resize"
    size: Size
    filter: Literal["LANCZOS", "NEAREST"] = "LANCZOS"

    def describe(self) -> str:
        return f"{self.filter} resize to {_size(self.size)}, locally"

    def apply(self, image: Image.Image) -> Image.Image:
        return image.resize(self.size, FILTERS[self.filter])


class CropToCanvas(_Step):
    """A1111's crop: the image pasted centred on a black RGB canvas of the requested size."""

    kind: Literal["crop"] = "crop"
    size: Size

    def describe(self) -> str:
        return f"centred on a black {_size(self.size)} canvas (the crop), locally"

    def apply(self, image: Image.Image) -> Image.Image:
        w, h = self.size
        canvas = Image.new("RGB", self.size)
        canvas.paste(image, (w // 2 - image.width // 2, h // 2 - image.height // 2))
        return canvas


LocalStep = Annotated[Resize | CropToCanvas, Field(discriminator="kind")]


class Branch(_Step):
    """One upscaler's work on the input: its V3 jobs (a chain), then its local steps."""

    field: Literal["upscaler_1", "upscaler_2"]
    upscaler: str
    v3_jobs: tuple[V3Job, ...] = ()
    steps: tuple[LocalStep, ...] = ()

    def describe(self) -> list[str]:
        name = f"{self.field} {self.upscaler!r}"
        return [f"{name}: {step.describe()}" for step in (*self.v3_jobs, *self.steps)]

    def apply(self, image: Image.Image) -> Image.Image:
        """From the input (no V3 job) or the last V3 job's output, to this branch's result."""
        for step in self.steps:
            image = step.apply(image)
        return image


class Blend(_Step):
    kind: Literal["blend"] = "blend"
    visibility: float
    to_first_mode: bool = False  # v1.9+: the second result converted to the first's mode

    def describe(self) -> str:
        return f"Image.blend(upscaler_1, upscaler_2, {self.visibility:g}), locally"

    def apply(self, first: Image.Image, second: Image.Image) -> Image.Image:
        if self.to_first_mode and second.mode != first.mode:
            second = second.convert(first.mode)
        return Image.blend(first, second, self.visibility)


class RestoreFaces(_Step):
    """GFPGAN then CodeFormer, as V2 ran them after the upscale, on an A1111-compatible server."""

    kind: Literal["faces"] = "faces"
    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0
    codeformer_weight: float = 0.0

    def describe(self) -> str:
        done = []
        if self.gfpgan_visibility:
            done.append(f"GFPGAN at visibility {self.gfpgan_visibility:g}")
        if self.codeformer_visibility:
            done.append(f"CodeFormer at visibility {self.codeformer_visibility:g}, "
                        f"weight {self.codeformer_weight:g}")
        return "face restoration on the configured A1111 server: " + ", then ".join(done)


def decode(data: bytes) -> Image.Image:
    """Decode with a pixel bound checked before any pixel is read (no decompression bombs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:  # Pillow's own bound, far past ours
            raise ImageTooLarge(f"the image is over {MAX_PIXELS} pixels ({e})") from None
        if image.width * image.height > MAX_PIXELS:
            raise ImageTooLarge(f"{image.width}x{image.height} is over {MAX_PIXELS} pixels")
        image.load()
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    # A palette with per-entry alpha goes through RGBA: the same RGB values as convert("RGB"),
    # without Pillow's warning about transparency it can't keep.
    if image.mode == "P" and isinstance(image.info.get("transparency"), bytes):
        image = image.convert("RGBA")
    return image.convert("RGB")
