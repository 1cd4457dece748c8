"""The legacy V2 API, emulated: `POST /v2/upscale`, `GET /v2/progress`, and the result images.

The stand-in for the real V2 while the proxy runs side by side with it (UPSCALE_PROXY_V2_UPSTREAM)
when there is no real one: offline, and in tests. Written from the spec alone (sections 1-3, 7,
8): the result is A1111's extras for the configured release line (proxy/emulator/a1111.py),
computed here, so that the proxy's translation can be compared with an independent V2.
"""

from __future__ import annotations

import asyncio
import binascii
import io
import math
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated

import orjson
import pybase64
from aiohttp import web
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from proxy.emulator.a1111 import A1111, DEFAULT_UPSCALER, UPSCALERS, A1111Failed
from proxy.emulator.app import sweeping
from proxy.emulator.legacy_settings import LegacySettings
from proxy.emulator.tasks import TaskStore

MAX_SIDE = 2048  # V2's documented limit on either side of the output
KEEP_TASKS_FOR = 60.0  # seconds a task outlives its image, so that a late poll still finds it
QUEUED, RUNNING, SUCCEEDED, FAILED = 0, 1, 2, 3


class V2Failure(Exception):
    """An answered V2 request with a non-zero code: HTTP 200, `data` null (spec sections 1, 3)."""

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code, self.msg = code, msg


# ---- the V2 body (spec section 1) ----

def _integral_float(value: object) -> object:
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_integral_float)]  # JSON has one kind of number: 1024.0 is 1024
Unit = Annotated[float, Field(ge=0, le=1)]
# pydantic error types that mean a value out of its range (code 6); any other error is code 1
RANGE_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal"})


class V2Body(BaseModel):
    """Null means "not set"; each resize mode reads (and range-checks) only its own fields."""

    model_config = ConfigDict(strict=True, extra="ignore")

    image: str
    upscaler_1: str | None = None
    resize_mode: Int | None = None
    upscaling_resize: float | None = None
    upscaling_resize_w: Int | None = None
    upscaling_resize_h: Int | None = None
    upscaling_crop: bool | None = None
    upscaler_2: str | None = None
    extras_upscaler_2_visibility: Unit | None = None
    gfpgan_visibility: Unit | None = None
    codeformer_visibility: Unit | None = None
    codeformer_weight: Unit | None = None
    img_expire_ttl: Annotated[Int, Field(ge=0, le=604800)] | None = None

    def extras_body(self) -> dict:
        """The fields A1111 reads, nulls left out (A1111's defaults then apply)."""
        body = self.model_dump(exclude={"image", "img_expire_ttl"}, exclude_none=True)
        body.setdefault("upscaler_1", DEFAULT_UPSCALER)
        return body


def parse_body(raw: bytes) -> V2Body:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise V2Failure(1, f"body is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise V2Failure(1, "body must be a JSON object")
    try:
        body = V2Body.model_validate(doc)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        where = ".".join(map(str, err["loc"])) or "body"
        raise V2Failure(6 if err["type"] in RANGE_ERRORS else 1, f"{where}: {err['msg']}") from None
    if body.resize_mode not in (None, 0, 1):
        raise V2Failure(6, "resize_mode: must be 0 (scale by) or 1 (scale to)")
    if body.resize_mode == 1:
        for name in ("upscaling_resize_w", "upscaling_resize_h"):
            value = getattr(body, name)
            if value is None:
                raise V2Failure(1, f"{name}: required when resize_mode is 1")
            if value < 1:
                raise V2Failure(6, f"{name}: must be at least 1")
    elif body.upscaling_resize is not None and body.upscaling_resize <= 0:
        raise V2Failure(6, "upscaling_resize: must be greater than 0")
    name1 = DEFAULT_UPSCALER if body.upscaler_1 is None else body.upscaler_1
    if name1 not in UPSCALERS:
        raise V2Failure(2, f"upscaler_1: no upscaler named {name1!r}")
    name2 = body.upscaler_2
    if (body.extras_upscaler_2_visibility or 0) > 0 and name2 not in (None, "", "None") and name2 not in UPSCALERS:
        raise V2Failure(2, f"upscaler_2: no upscaler named {name2!r}")
    return body


def decode_image(text: str) -> bytes:
    """The image's bytes, from base64 with or without a `data:image/...;base64,` prefix."""
    if text.startswith("data:"):
        prefix, comma, text = text.partition(",")
        if not comma or not prefix.endswith(";base64"):
            raise V2Failure(6, "image: a data URI must be data:image/...;base64,...")
    try:
        return pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise V2Failure(6, "image: is not valid base64") from None


def check_output_size(extras: A1111, data: bytes, body: dict) -> None:
    """Refuse what V2 refused before queueing: an undecodable image, an output over 2048 px, or a
    side that rounds to 0 (A1111 failed on it from 1.4)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = extras.output_size(im, body)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError):
        raise V2Failure(6, "image: not an image V2 can decode") from None
    if width > MAX_SIDE or height > MAX_SIDE:
        raise V2Failure(6, f"the output would be {width}x{height}, over {MAX_SIDE} px on a side")
    if width < 1 or height < 1:
        raise V2Failure(6, f"the output would be {width}x{height}: a side rounds to 0")


# ---- tasks ----

@dataclass
class LegacyTask:
    """A V2 task: status 0 for `queue_delay`, 1 for `process_delay` and until the extras are done,
    then 2 (or 3). The extras run from submission, in a thread; the input goes once they have."""

    task_id: str
    key: str
    image: bytes  # the input, until the extras have run
    ttl: int  # seconds the result stays downloadable
    queue_delay: float
    process_delay: float
    fail_reason: str | None = None  # injected at submission, or why the extras failed
    submitted: float = field(default_factory=time.time)
    result: bytes | None = None  # the PNG; None again once its ttl has passed (TaskStore.sweep)
    done_at: float | None = None  # when the extras finished (or the task was set to fail)

    @property
    def executes(self) -> float:
        return self.submitted + self.queue_delay

    @property
    def completes(self) -> float:
        return self.executes + self.process_delay

    def finished(self) -> float:
        return max(self.completes, self.done_at or 0)

    def status(self, now: float) -> int:
        if now < self.executes:
            return QUEUED
        if now < self.completes or self.done_at is None:
            return RUNNING
        return FAILED if self.fail_reason else SUCCEEDED


def run_extras(line: str, data: bytes, body: dict) -> bytes:
    """In a worker thread: the extras, on an event loop of this thread's own (`A1111` awaits its
    model passes, which here run in-process)."""
    return asyncio.run(A1111(line).extras_png(data, body))


def _done(emu: LegacyV2, task: LegacyTask, work: asyncio.Future[bytes]) -> None:
    if work.cancelled():
        task.fail_reason = "the emulator stopped"
    elif isinstance(e := work.exception(), A1111Failed):
        task.fail_reason = f"A1111 failed: {e}"
    elif e is not None:  # pixels that do not decode past a header that did, say
        task.fail_reason = f"the image could not be processed: {e}"
    else:
        task.result = work.result()
    task.image, task.done_at = b"", time.time()
    emu.tasks.recount(task)


# ---- the service ----

@dataclass
class LegacyV2:
    """The emulator's state; tests may read `requests` (calls seen, by endpoint: upscale,
    progress, image) and `tasks`, and change `settings` at run time."""

    settings: LegacySettings
    tasks: TaskStore = field(default_factory=TaskStore)  # bounded: proxy/emulator/tasks.py
    requests: Counter[str] = field(default_factory=Counter)
    injected: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def inject(self, endpoint: str) -> None:
        """Raise the configured fault for this call, if the dice say so."""
        s = self.settings
        if s.error_code is None or endpoint not in s.error_endpoints:
            return
        if s.error_limit is not None and self.injected >= s.error_limit:
            return
        if self.rng.random() >= s.error_rate:
            return
        self.injected += 1
        if endpoint == "image":  # an image is a plain download: its fault is HTTP's
            raise web.HTTPServiceUnavailable(text="503 Service Unavailable (injected by the emulator)")
        raise V2Failure(s.error_code, "injected by the emulator")

    def check_gone(self) -> None:
        """V2 removed: its routes answer as a removed API would, not in V2's envelope."""
        status = self.settings.gone
        if status is None:
            return
        error = web.HTTPGone if status == 410 else web.HTTPNotFound
        if self.settings.gone_format == "json":
            raise error(text=orjson.dumps({"code": status, "reason": "GONE" if status == 410 else "NOT_FOUND",
                                           "message": "the V2 API has been removed: use V3", "metadata": {}}).decode(),
                        content_type="application/json")
        raise error(text=f"{status}: {error.reason}")

    def sweep(self, now: float) -> None:
        """Results go once their ttl has passed; their tasks a minute later."""
        self.tasks.sweep(now, lambda task: task.ttl, keep_for=KEEP_TASKS_FOR)


LEGACY_V2 = web.AppKey("legacy_v2", LegacyV2)


def _reply(code: int, msg: str = "", data: dict | None = None) -> web.Response:
    return web.Response(body=orjson.dumps({"code": code, "msg": msg, "data": data}),
                        content_type="application/json")


@web.middleware
async def v2_errors(request: web.Request, handler):
    emu = request.app[LEGACY_V2]
    if emu.settings.latency:
        await asyncio.sleep(emu.settings.latency)
    try:
        return await handler(request)
    except V2Failure as e:
        return _reply(e.code, e.msg)


def _key(request: web.Request) -> str:
    """`Authorization: Bearer KEY`, a bare key in Authorization, or the oldest clients' X-Omni-Key."""
    header = request.headers.get("Authorization", "").strip()
    scheme, _, rest = header.partition(" ")
    key = rest.strip() if scheme.lower() == "bearer" else header
    key = key or request.headers.get("X-Omni-Key", "").strip()
    if not key:
        raise V2Failure(4, "missing api key: send Authorization: Bearer <key>")
    keys = request.app[LEGACY_V2].settings.api_keys
    if keys and key not in keys:
        raise V2Failure(4, "invalid api key")
    return key


def _base(request: web.Request) -> str:
    """Where image URLs point: the configured public URL, or the address the request came to."""
    return (request.app[LEGACY_V2].settings.public_url or f"{request.scheme}://{request.host}").rstrip("/")


async def upscale(request: web.Request) -> web.Response:
    emu = request.app[LEGACY_V2]
    emu.requests["upscale"] += 1
    emu.check_gone()
    key = _key(request)
    emu.inject("upscale")
    body = parse_body(await request.read())
    data = decode_image(body.image)
    s = emu.settings
    extras, line = body.extras_body(), s.a1111_profile
    check_output_size(A1111(line), data, extras)
    fail = s.fail_reason if s.fail_rate and emu.rng.random() < s.fail_rate else None
    task = LegacyTask(task_id=str(uuid.uuid4()), key=key, image=b"" if fail else data,
                      ttl=body.img_expire_ttl or s.image_ttl, queue_delay=s.queue_delay,
                      process_delay=s.process_delay, fail_reason=fail)
    emu.tasks.add(task)
    if fail:
        task.done_at = task.submitted
    else:
        work = asyncio.get_running_loop().run_in_executor(None, run_extras, line, data, extras)
        work.add_done_callback(partial(_done, emu, task))
    return _reply(0, "", {"task_id": task.task_id, "warn": ""})


def _clock(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) if t else ""


def _ms(t: float | None) -> int:
    return int(t * 1000) if t else 0


def progress_data(task: LegacyTask, now: float, base: str) -> dict:
    """V2's progress `data` (spec section 2), every field present."""
    status = task.status(now)
    final = status in (SUCCEEDED, FAILED)
    started = task.executes if status != QUEUED else None
    finished = task.finished() if final else None
    if final:
        fraction = 1.0
    elif status == RUNNING and task.process_delay:
        fraction = round(min((now - task.executes) / task.process_delay, 0.99), 2)
    else:
        fraction = 0.0
    return {
        "status": status,
        "progress": fraction,
        "eta_relative": 0 if final else max(0, math.ceil(task.completes - now)),
        "imgs": [f"{base}/v2/images/{task.task_id}.png"] if status == SUCCEEDED else None,
        "failed_reason": (task.fail_reason or "") if status == FAILED else "",
        "current_images": [],
        "submit_time": _clock(task.submitted),
        "execution_time": _clock(started),
        "txt2img_time": _clock(finished),
        "finish_time": _clock(finished),
        "info": "",
        "enable_nsfw_detection": False,
        "nsfw_detection_result": [],
        "debug_info": {"submit_time_ms": _ms(task.submitted), "execution_time_ms": _ms(started),
                       "txt2img_time_ms": _ms(finished), "finish_time_ms": _ms(finished)},
    }


async def progress(request: web.Request) -> web.Response:
    emu = request.app[LEGACY_V2]
    emu.requests["progress"] += 1
    emu.check_gone()
    key = _key(request)
    emu.inject("progress")
    task = emu.tasks.get(request.query.get("task_id", ""))
    if task is None or task.key != key:  # a task is visible to the key that made it only
        raise V2Failure(3, "task not found")
    return _reply(0, "", progress_data(task, time.time(), _base(request)))


async def image(request: web.Request) -> web.Response:
    emu = request.app[LEGACY_V2]
    emu.requests["image"] += 1
    emu.inject("image")
    task = emu.tasks.get(request.match_info["task_id"])
    if task is None or task.status(time.time()) != SUCCEEDED:
        raise web.HTTPNotFound(text="no such image")
    if time.time() > task.finished() + task.ttl or task.result is None:
        raise web.HTTPForbidden(text="Request has expired")
    return web.Response(body=task.result, content_type="image/png")


def create_legacy_app(settings: LegacySettings | None = None) -> web.Application:
    """The legacy V2 emulator; `app[LEGACY_V2]` is its state."""
    settings = settings or LegacySettings()
    app = web.Application(middlewares=[v2_errors], client_max_size=48 * 1024 * 1024)
    app[LEGACY_V2] = LegacyV2(settings, rng=random.Random(settings.seed))
    app.cleanup_ctx.append(sweeping(LEGACY_V2))
    app.router.add_post("/v2/upscale", upscale)
    app.router.add_get("/v2/progress", progress)
    app.router.add_get("/v2/images/{task_id}.png", image)
    return app
