"""A test oracle: AUTOMATIC1111's extras (`/sdapi/v1/extra-single-image`), as each release line
ran them, transcribed from A1111's own code (spec section 7; modules/upscaler.py `Upscaler.upscale`,
scripts/postprocessing_upscale.py, modules/postprocessing.py, modules/images.py `fix_image`,
modules/api/api.py `encode_pil_to_base64`). It imports nothing from the proxy.

The only thing that is not A1111 is the model: a pass of an AI upscaler is a real V3 job on the
emulator at scale_factor 4, the models' native factor, so that the proxy and this oracle can be
compared pixel for pixel.
"""

from __future__ import annotations

import asyncio
import base64
import io
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from PIL import Image, ImageOps

from tests.helpers import AUTH
from tests.images import encode

LANCZOS, NEAREST = Image.Resampling.LANCZOS, Image.Resampling.NEAREST
MODELS = {"R-ESRGAN 4x+ Anime6B": "RealESRGAN_x4plus_anime_6B", "R-ESRGAN 4x+": "RealESRNet_x4plus",
          "4x-UltraSharp": "4x-UltraSharp", "LDSR": "RealESRNet_x4plus"}


class A1111Failed(Exception):
    """Where A1111 itself answered HTTP 500 (e.g. a palette colour key saved on an RGB result)."""


@dataclass(frozen=True)
class Release:
    """What changed between the lines (spec 7.2, checked against the release tags)."""

    dest_multiple_of_8: bool  # 3539885f, from 1.4
    check_before_pass: bool  # 4a666381, from 1.7
    stop_at_scale_1: str  # "yes"; "no" (9d4fdc45, 1.9.3-1.9.4); "i > 0" (964fc13a, 1.10)
    fix_image: bool  # 1.9: images.read -> exif_transpose + fix_png_transparency; RGB/RGBA kept
    info_after_convert: bool  # 1.10 reads the PNG info after the RGB conversion


RELEASES = {
    "v1.3": Release(False, False, "yes", False, False),
    "v1.6": Release(True, False, "yes", False, False),
    "v1.8": Release(True, True, "yes", False, False),
    "v1.9": Release(True, True, "yes", True, False),
    "v1.9.4": Release(True, True, "no", True, False),
    "v1.10": Release(True, True, "i > 0", True, True),
}


def native_pass_on(emulator_url: str) -> Callable[[str, Image.Image], Awaitable[Image.Image]]:
    """One pass of a model: a V3 job at scale_factor 4 on the emulator, its image decoded."""

    async def run(name: str, image: Image.Image) -> Image.Image:
        body = {"request": {"model_name": MODELS[name], "scale_factor": 4,
                            # a model gets pixels (a numpy array): no PNG colour key goes with them
                            "image_base64": base64.b64encode(encode(image, "PNG", transparency=None)).decode()}}
        async with aiohttp.ClientSession(base_url=emulator_url, headers=AUTH) as http:
            async with http.post("/v3/async/upscale", json=body) as resp:
                task_id = (await resp.json())["task_id"]
            while True:
                async with http.get("/v3/async/task-result", params={"task_id": task_id}) as resp:
                    result = await resp.json()
                if result["task"]["status"] == "TASK_STATUS_SUCCEED":
                    break
                await asyncio.sleep(0.01)
            async with http.get(result["images"][0]["image_url"]) as resp:
                out = Image.open(io.BytesIO(await resp.read()))
                out.load()
        return out.convert("RGB")  # torch_bgr_to_pil_image: models give RGB

    return run


class A1111:
    def __init__(self, line: str, native_pass: Callable[[str, Image.Image], Awaitable[Image.Image]]) -> None:
        self.r = RELEASES[line]
        self.native_pass = native_pass

    async def extras(self, data: bytes, body: dict) -> Image.Image:
        """The result image, with `info["transparency"]` set where A1111 wrote a tRNS chunk."""
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
        result = await self.upscale_script(image, body)
        return _saved_png(result, existing)

    async def upscale_script(self, image: Image.Image, body: dict) -> Image.Image:
        name1 = body.get("upscaler_1", "R-ESRGAN 4x+")
        if name1 == "None":
            return image
        mode = body.get("resize_mode") or 0
        w, h = body.get("upscaling_resize_w"), body.get("upscaling_resize_h")
        scale = max(w / image.width, h / image.height) if mode == 1 else body.get("upscaling_resize", 2)
        crop = mode == 1 and body.get("upscaling_crop")
        first = await self.upscale_one(image, name1, scale, (w, h) if crop else None)
        name2, v = body.get("upscaler_2"), body.get("extras_upscaler_2_visibility") or 0
        if name2 and name2 != "None" and v > 0:
            second = await self.upscale_one(image, name2, scale, (w, h) if crop else None)
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
        if self.r.dest_multiple_of_8:
            dest_w, dest_h = int((img.width * scale) // 8 * 8), int((img.height * scale) // 8 * 8)
        else:
            dest_w, dest_h = int(img.width * scale), int(img.height * scale)
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


def _saved_png(result: Image.Image, existing: dict) -> Image.Image:
    """`pp.image.info = existing_pnginfo`, then encode_pil_to_base64's PNG save, read back."""
    key = existing.get("transparency")
    if result.mode == "RGB" and key is not None and not isinstance(key, tuple):
        raise A1111Failed("an int or bytes transparency saved on an RGB PNG")
    buf = io.BytesIO()
    result.save(buf, "PNG", transparency=key if result.mode == "RGB" else None)
    out = Image.open(io.BytesIO(buf.getvalue()))
    out.load()
    return out
