"""Emulated V3 tasks: a timeline QUEUED -> PROCESSING -> SUCCEED|FAILED, and a real upscale.

The status follows from the time since submission, so it is predictable; the upscale itself runs
lazily, once, when the task is first seen past its processing time.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image, ImageFilter

# Stand-ins for the three models: deterministic, and different from each other, so a test can tell
# which model produced an image.
WEIGHTS_V3_LACKS = "weights V3 lacks"  # V2's other models (proxy/emulator/a1111.py); V3 refuses the name
MODEL_FILTERS = {
    "RealESRGAN_x4plus_anime_6B": Image.Resampling.BICUBIC,
    "RealESRNet_x4plus": Image.Resampling.LANCZOS,
    "4x-UltraSharp": Image.Resampling.LANCZOS,
    # close to RealESRNet_x4plus, which the proxy runs in their place, but not the same pixels
    WEIGHTS_V3_LACKS: Image.Resampling.HAMMING,
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
    result: bytes | None = None  # None again once its image URL has expired (TaskStore.sweep)
    settled: bool = False  # past its processing time and upscaled (or failed): the input is gone
    _work: asyncio.Future[bytes] | None = None

    @property
    def executes(self) -> float:
        return self.submitted + self.queue_delay

    @property
    def completes(self) -> float:
        return self.executes + self.process_delay

    async def settle(self, now: float) -> str:
        """The V3 status at `now`; past the processing time, runs the upscale once, then lets go
        of the input."""
        if now < self.executes:
            return "TASK_STATUS_QUEUED"
        if now < self.completes:
            return "TASK_STATUS_PROCESSING"
        if not self.settled:
            if self.fail_reason is None:
                if self._work is None:
                    loop = asyncio.get_running_loop()
                    self._work = loop.run_in_executor(
                        None, upscale, self.image, self.model, self.factor, self.image_type
                    )
                work = self._work
                try:
                    self.result = await asyncio.shield(work)
                except Exception as e:  # noqa: BLE001 (a header that parsed but pixels that don't)
                    self.fail_reason = f"image decode failed: {e}"
            # the input is no longer needed, nor the future (it holds the result too)
            self.settled, self.image, self._work = True, b"", None
        return "TASK_STATUS_FAILED" if self.fail_reason else "TASK_STATUS_SUCCEED"


MAX_TASKS = 10_000  # tasks kept at most, the oldest dropped first
MAX_BYTES = 512 * 1024 * 1024  # bytes of images kept at most (inputs not yet upscaled, and results)


class TaskStore:
    """The emulator's tasks, oldest first, bounded by count and by the bytes of images they hold.

    An input is dropped once upscaled (`Task.settle`), a result once its image URL has expired
    (`sweep`); past `max_tasks` tasks or `max_bytes` bytes the oldest tasks go first, as if they had
    expired (the newest is always kept). Sizes are counted when a task is added, and again when
    `recount` is told that its images changed."""

    def __init__(self, max_tasks: int = MAX_TASKS, max_bytes: int = MAX_BYTES) -> None:
        self.max_tasks, self.max_bytes = max_tasks, max_bytes
        self._tasks: dict[str, Task] = {}  # in submission order
        self._sizes: dict[str, int] = {}  # task id -> its bytes, as last counted
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._tasks)

    def get(self, task_id: str) -> Task | None:
        return self._tasks.get(task_id)

    def __getitem__(self, task_id: str) -> Task:
        return self._tasks[task_id]

    def add(self, task: Task) -> None:
        self._tasks[task.task_id] = task
        self._sizes[task.task_id] = 0
        self.recount(task)

    def recount(self, task: Task) -> None:
        if task.task_id not in self._sizes:
            return  # dropped meanwhile
        size = len(task.image) + len(task.result or b"")
        self.bytes += size - self._sizes[task.task_id]
        self._sizes[task.task_id] = size
        while len(self._tasks) > 1 and (len(self._tasks) > self.max_tasks or self.bytes > self.max_bytes):
            self._drop(next(iter(self._tasks)))

    def sweep(self, now: float, image_url_ttl: float | Callable[[Task], float], keep_for: float) -> None:
        """Drop the results whose URLs have expired, and the tasks `keep_for` seconds after that.
        `image_url_ttl` may be a function of the task (V2's `img_expire_ttl` is per task)."""
        for task in list(self._tasks.values()):
            ttl = image_url_ttl(task) if callable(image_url_ttl) else image_url_ttl
            if now - task.completes > ttl + keep_for:
                self._drop(task.task_id)
            elif now - task.completes > ttl and task.result is not None:
                task.result = None
                self.recount(task)

    def _drop(self, task_id: str) -> None:
        del self._tasks[task_id]
        self.bytes -= self._sizes.pop(task_id)
