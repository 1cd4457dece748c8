"""The test oracle: AUTOMATIC1111's extras per release line, which ships in the emulator package
(proxy/emulator/a1111.py, imported by nothing of the proxy's translation), with the model pass
the proxy's tests compare against: a real V3 job on the V3 emulator at scale_factor 4, the models'
native factor, so that the proxy and this oracle can be compared pixel for pixel.
"""

from __future__ import annotations

import asyncio
import base64
import io

import aiohttp
from PIL import Image

from proxy.emulator.a1111 import A1111, RELEASES, A1111Failed, NativePass
from tests.helpers import AUTH
from tests.images import encode

__all__ = ["A1111", "MODELS", "RELEASES", "A1111Failed", "native_pass_on"]

# V2 name -> the V3 model the proxy runs for it (its weights or the closest: spec section 8)
MODELS = {"R-ESRGAN 4x+ Anime6B": "RealESRGAN_x4plus_anime_6B", "R-ESRGAN 4x+": "RealESRNet_x4plus",
          "4x-UltraSharp": "4x-UltraSharp", "LDSR": "RealESRNet_x4plus"}


def native_pass_on(emulator_url: str) -> NativePass:
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
