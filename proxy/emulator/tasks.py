"""Emulated V3 tasks: a timeline QUEUED -> PROCESSING -> SUCCEED|FAILED, and a real upscale.

The status follows from the time since submission, so it is predictable; the upscale itself runs
lazily, once, when the task is first seen past its processing time.
"""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import dataclass, field

from PIL import Image, ImageFilter

# Stand-ins for the three models: deterministic, and different from each other, so a test can tell
# which model produced an image.
MODEL_FILTERS = {
    "RealESRGAN_x4plus_anime_6B": Image.Resampling.BICUBIC,
    "RealESRNet_x4plus": Image.Resampling.LANCZOS,
    "4x-UltraSharp": Image.Resampling.LANCZOS,
}
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def upscale(data: bytes, model: str, factor: float, image_type: str) -> bytes:
    """The emulated model: output int(W*s) x int(H*s), RGB (RGBA kept for png/webp), encoded."""
    with Image.open(io.BytesIO(data)) as im:
        has_alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
        mode = "RGBA" if has_alpha and image_type != "jpeg" else "RGB"
        src = im.convert(mode)
    out = src.resize((int(src.width * factor), int(src.height * factor)), MODEL_FILTERS[model])
    if model == "4x-UltraSharp":
        out = out.filter(ImageFilter.SHARPEN)
    buf = io.BytesIO()
    out.save(buf, PIL_FORMATS[image_type], **({"lossless": True} if image_type == "webp" else {}))
    return buf.getvalue()


@dataclass
class Task:
    task_id: str
    key: str
    model: str
    factor: float
    image_type: str
    image: bytes
    queue_delay: float
    process_delay: float
    fail_reason: str | None  # decided at submission (fault injection)
    submitted: float = field(default_factory=time.time)
    result: bytes | None = None
    _work: asyncio.Future[bytes] | None = None

    @property
    def executes(self) -> float:
        return self.submitted + self.queue_delay

    @property
    def completes(self) -> float:
        return self.executes + self.process_delay

    async def settle(self, now: float) -> str:
        """The V3 status at `now`; past the processing time, runs the upscale once."""
        if now < self.executes:
            return "TASK_STATUS_QUEUED"
        if now < self.completes:
            return "TASK_STATUS_PROCESSING"
        if self.fail_reason is None and self.result is None:
            if self._work is None:
                loop = asyncio.get_running_loop()
                self._work = loop.run_in_executor(
                    None, upscale, self.image, self.model, self.factor, self.image_type
                )
            try:
                self.result = await asyncio.shield(self._work)
            except Exception as e:  # a header that parsed but pixels that don't
                self.fail_reason = f"image decode failed: {e}"
            self.image = b""  # the input is no longer needed
        return "TASK_STATUS_FAILED" if self.fail_reason else "TASK_STATUS_SUCCEED"
