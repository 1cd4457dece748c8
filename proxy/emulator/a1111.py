"""AUTOMATIC1111's extras (`/sdapi/v1/extra-single-image`) as each release line ran them: what the
legacy V2 hosted (spec section 7). Transcribed from A1111's own code: modules/upscaler.py
`Upscaler.upscale`, scripts/postprocessing_upscale.py, scripts/postprocessing_gfpgan.py and
postprocessing_codeformer.py, modules/postprocessing.py, modules/images.py `fix_image`,
modules/api/api.py `encode_pil_to_base64`. It imports nothing from the proxy's translation.

The legacy V2 emulator runs it, and the test suite uses it as its oracle. Two things are not A1111:
a model pass is a function handed to `A1111` (the V2 emulator's, `model_pass`, runs the V3
emulator's fake model in this process; the tests' runs a V3 job over HTTP), and GFPGAN and
CodeFormer are deterministic stand-ins.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageOps

from proxy.emulator import tasks

LANCZOS, NEAREST = Image.Resampling.LANCZOS, Image.Resampling.NEAREST
ORIENTATION = 0x0112  # the EXIF tag exif_transpose reads

ReleaseLine = Literal["v1.3", "v1.6", "v1.8", "v1.9", "v1.9.4", "v1.10"]
DEFAULT_UPSCALER = "R-ESRGAN 4x+"  # what a null upscaler_1 means (the legacy SDKs' default)
LOCAL = ("Lanczos", "Nearest", "None")
# V2 upscaler -> the V3 model with the same weights (spec section 8)
V3_WEIGHTS = {"R-ESRGAN 4x+ Anime6B": "RealESRGAN_x4plus_anime_6B", "4x-UltraSharp": "4x-UltraSharp"}
# models V2 ran whose weights V3 does not have
OTHER_WEIGHTS = ("R-ESRGAN 4x+", "ESRGAN_4x", "LDSR", "ScuNET GAN", "ScuNET PSNR", "SwinIR 4x",
                 "R-ESRGAN General 4xV3", "R-ESRGAN General WDN 4xV3", "R-ESRGAN 2x+", "R-ESRGAN AnimeVideo",
                 "DAT x2", "DAT x3", "DAT x4")
UPSCALERS = frozenset({*LOCAL, *V3_WEIGHTS, *OTHER_WEIGHTS})  # every name V2 knew; others are code 2

NativePass = Callable[[str, Image.Image], Awaitable[Image.Image]]


class A1111Failed(Exception):
    """Where A1111 itself failed (HTTP 500), e.g. a palette colour key saved on an RGB result."""


@dataclass(frozen=True)
class Release:
    """What changed between the lines (spec 7.2, checked against the release tags)."""

    dest_multiple_of_8: bool  # 3539885f, from 1.4
    check_before_pass: bool  # 4a666381, from 1.7
    stop_at_scale_1: str  # "yes"; "no" (9d4fdc45, 1.9.3-1.9.4); "i > 0" (964fc13a, 1.10)
    fix_image: bool  # 1.9: images.read -> exif_transpose + fix_png_transparency; RGB/RGBA kept
    info_after_convert: bool  # 1.10 reads the PNG info after the RGB conversion


RELEASES: dict[str, Release] = {
    "v1.3": Release(False, False, "yes", False, False),
    "v1.6": Release(True, False, "yes", False, False),
    "v1.8": Release(True, True, "yes", False, False),
    "v1.9": Release(True, True, "yes", True, False),
    "v1.9.4": Release(True, True, "no", True, False),
    "v1.10": Release(True, True, "i > 0", True, True),
}


def gfpgan_stand_in(image: Image.Image) -> Image.Image:
    return ImageOps.invert(image)


def codeformer_stand_in(image: Image.Image, weight: float) -> Image.Image:
    """Like CodeFormer's weight: 0 changes the most (1 bit per channel), 1 keeps the input (8 bits)."""
    return ImageOps.posterize(image, 1 + round(weight * 7))


def restore_faces(image: Image.Image, body: dict) -> Image.Image:
    """GFPGAN, then CodeFormer, each on the RGB pixels and blended in by its visibility; 0 skips."""
    gfpgan, codeformer = body.get("gfpgan_visibility") or 0, body.get("codeformer_visibility") or 0
    if gfpgan > 0:
        image = image.convert("RGB")
        image = Image.blend(image, gfpgan_stand_in(image), gfpgan)
    if codeformer > 0:
        image = image.convert("RGB")
        image = Image.blend(image, codeformer_stand_in(image, body.get("codeformer_weight") or 0), codeformer)
    return image


async def model_pass(name: str, image: Image.Image) -> Image.Image:
    """One pass of a model, as the V2 emulator runs it: the V3 emulator's fake model at its native
    4x, in this process. A model V3 has the weights of is that V3 model; one it lacks is another
    filter, close to the V3 model the proxy runs instead, so that the two differ a little."""
    model = V3_WEIGHTS.get(name, tasks.WEIGHTS_V3_LACKS)
    out = Image.open(io.BytesIO(tasks.upscale(pixels_png(image), model, 4, "png")))
    out.load()
    return out.convert("RGB")  # torch_bgr_to_pil_image: models give RGB


def pixels_png(image: Image.Image) -> bytes:
    """A model gets pixels (a numpy array): the PNG handed to one carries no colour key, which
    `convert("RGB")` keeps in `info`."""
    buf = io.BytesIO()
    image.save(buf, "PNG", transparency=None)
    return buf.getvalue()


class A1111:
    """The extras of one release line; `body` is a V2 body without its nulls (missing: A1111's
    defaults)."""

    def __init__(self, line: str, native_pass: NativePass = model_pass) -> None:
        self.r = RELEASES[line]
        self.native_pass = native_pass

    async def extras(self, data: bytes, body: dict) -> Image.Image:
        """The result image, with `info["transparency"]` set where A1111 wrote a tRNS chunk."""
        out = Image.open(io.BytesIO(await self.extras_png(data, body)))
        out.load()
        return out

    async def extras_png(self, data: bytes, body: dict) -> bytes:
        """The result as the PNG A1111's API encoded."""
        image = Image.open(io.BytesIO(data))  # decode_base64_to_image
        image.load()
        if self.r.fix_image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGB", "P") and isinstance(image.info.get("transparency"), bytes):
                image = image.convert("RGBA")
        if not self.r.info_after_convert:
            existing = dict(image.info)
        if self.r.fix_image:
            image = image if image.mode in ("RGBA", "RGB") else _convert_rgb(image)
        else:
            image = _convert_rgb(image)
        if self.r.info_after_convert:
            existing = dict(image.info)
        result = restore_faces(await self.upscale_script(image, body), body)
        return _png(result, existing)

    def output_size(self, image: Image.Image, body: dict) -> tuple[int, int]:
        """The size `extras` gives `image` (opened; its pixels needn't be loaded), without upscaling."""
        width, height = image.size
        if self.r.fix_image and image.getexif().get(ORIENTATION) in (5, 6, 7, 8):  # exif_transpose turns it
            width, height = height, width
        if body.get("upscaler_1", DEFAULT_UPSCALER) == "None":
            return width, height
        scale, crop = self.factor(width, height, body)
        return crop or self.dest(width, height, scale)

    def factor(self, width: int, height: int, body: dict) -> tuple[float, tuple[int, int] | None]:
        """The scale factor, and the crop size where there is one."""
        mode = body.get("resize_mode") or 0
        w, h = body.get("upscaling_resize_w"), body.get("upscaling_resize_h")
        scale = max(w / width, h / height) if mode == 1 else body.get("upscaling_resize", 2)
        return scale, (w, h) if mode == 1 and body.get("upscaling_crop") else None

    def dest(self, width: int, height: int, scale: float) -> tuple[int, int]:
        if self.r.dest_multiple_of_8:
            return int((width * scale) // 8 * 8), int((height * scale) // 8 * 8)
        return int(width * scale), int(height * scale)

    async def upscale_script(self, image: Image.Image, body: dict) -> Image.Image:
        name1 = body.get("upscaler_1", DEFAULT_UPSCALER)
        if name1 == "None":
            return image
        scale, crop = self.factor(image.width, image.height, body)
        first = await self.upscale_one(image, name1, scale, crop)
        name2, v = body.get("upscaler_2"), body.get("extras_upscaler_2_visibility") or 0
        if name2 and name2 != "None" and v > 0:
            second = await self.upscale_one(image, name2, scale, crop)
            if self.r.fix_image and first.mode != second.mode:
                second = second.convert(first.mode)
            first = Image.blend(first, second, v)
        return first

    async def upscale_one(self, image: Image.Image, name: str, scale: float, crop: tuple | None) -> Image.Image:
        image = await self.upscale(image, name, scale)
        if crop:
            cropped = Image.new("RGB", crop)
            cropped.paste(image, box=(crop[0] // 2 - image.width // 2, crop[1] // 2 - image.height // 2))
            image = cropped
        return image

    async def upscale(self, img: Image.Image, name: str, scale: float) -> Image.Image:
        """Upscaler.upscale."""
        dest_w, dest_h = self.dest(img.width, img.height, scale)
        if dest_w == 0 or dest_h == 0:
            raise A1111Failed("Image.resize to a side of 0")
        for i in range(3):
            if self.r.check_before_pass and img.width >= dest_w and img.height >= dest_h and (
                    scale != 1 or self.r.stop_at_scale_1 == "yes" or (self.r.stop_at_scale_1 == "i > 0" and i > 0)):
                break
            shape = (img.width, img.height)
            img = await self.do_upscale(img, name, scale)
            if shape == (img.width, img.height):
                break
            if not self.r.check_before_pass and img.width >= dest_w and img.height >= dest_h:
                break
        if img.width != dest_w or img.height != dest_h:
            img = img.resize((int(dest_w), int(dest_h)), resample=LANCZOS)
        return img

    async def do_upscale(self, img: Image.Image, name: str, scale: float) -> Image.Image:
        if name in ("Lanczos", "Nearest"):
            return img.resize((int(img.width * scale), int(img.height * scale)),
                              resample=LANCZOS if name == "Lanczos" else NEAREST)
        return await self.native_pass(name, img.convert("RGB"))


def _convert_rgb(image: Image.Image) -> Image.Image:
    with warnings.catch_warnings():  # Pillow warns about palette transparency it drops
        warnings.simplefilter("ignore")
        return image.convert("RGB")


def _png(result: Image.Image, existing: dict) -> bytes:
    """`pp.image.info = existing_pnginfo`, then encode_pil_to_base64's PNG save."""
    key = existing.get("transparency")
    if result.mode == "RGB" and key is not None and not isinstance(key, tuple):
        raise A1111Failed("an int or bytes transparency saved on an RGB PNG")
    buf = io.BytesIO()
    result.save(buf, "PNG", transparency=key if result.mode == "RGB" else None)
    return buf.getvalue()
