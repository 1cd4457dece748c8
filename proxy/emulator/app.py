"""The emulated V3 HTTP surface: upscale, task-result, the image URLs it hands out, webhooks."""

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

import aiohttp
import orjson
import pybase64
from aiohttp import web
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError

from proxy.emulator.settings import EmulatorSettings
from proxy.emulator.tasks import Task, TaskStore
from proxy.emulator.v3 import MAX_BYTES, MAX_SIDE, UpscaleBody, V3Error

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
SWEEP_EVERY = 60.0
FINAL = ("TASK_STATUS_SUCCEED", "TASK_STATUS_FAILED")
WEBHOOK_ATTEMPTS = 6  # the first call and V3's 5 retries
WEBHOOK_TIMEOUT = aiohttp.ClientTimeout(total=5)


@dataclass
class Emulator:
    """The emulator's state; tests may read `requests` (calls seen, by endpoint, and "webhook"
    attempts made) and `webhook_calls` (url, HTTP status or exception name) per attempt."""

    settings: EmulatorSettings
    tasks: TaskStore = field(default_factory=TaskStore)  # bounded: proxy/emulator/tasks.py
    requests: Counter[str] = field(default_factory=Counter)
    injected: int = 0
    rng: random.Random = field(default_factory=random.Random)
    webhook_calls: list[tuple[str, int | str]] = field(default_factory=list)
    http: aiohttp.ClientSession | None = None  # for webhooks; open while the app runs
    deliveries: set[asyncio.Task[None]] = field(default_factory=set)  # pending webhooks

    def inject(self, endpoint: str) -> None:
        """Raise the configured fault for this call, if the dice say so."""
        s = self.settings
        if not s.error_reason or endpoint not in s.error_endpoints:
            return
        if s.error_limit is not None and self.injected >= s.error_limit:
            return
        if self.rng.random() >= s.error_rate:
            return
        self.injected += 1
        if s.error_reason == "GATEWAY_TIMEOUT":  # what a load balancer in front of V3 sends
            raise web.HTTPGatewayTimeout(text="<html><body>504 Gateway Time-out</body></html>",
                                         content_type="text/html")
        raise V3Error(s.error_reason, "injected by the emulator")

    def sweep(self, now: float) -> None:
        """Results go once their URLs have expired; their tasks a minute later."""
        self.tasks.sweep(now, self.settings.image_url_ttl, keep_for=60)


EMULATOR = web.AppKey("emulator", Emulator)


def _json(doc: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type="application/json")


def _key(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise V3Error("MISSING_API_KEY", "missing api key: send Authorization: Bearer <key>")
    keys = request.app[EMULATOR].settings.api_keys
    if keys and key.strip() not in keys:
        raise V3Error("INVALID_API_KEY", "invalid api key")
    return key.strip()


@web.middleware
async def v3_errors(request: web.Request, handler):
    emu = request.app[EMULATOR]
    if emu.settings.latency:
        await asyncio.sleep(emu.settings.latency)
    try:
        return await handler(request)
    except V3Error as e:
        return _json(e.body(), e.status)


def _decode_image(b64: str) -> bytes:
    try:
        data = pybase64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise V3Error("INVALID_REQUEST_BODY", "request.image_base64 is not valid base64") from None
    if len(data) > MAX_BYTES:
        raise V3Error("IMAGE_FILE_EXCEEDS_MAX_SIZE", f"image is over {MAX_BYTES} bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise V3Error("INVALID_IMAGE_FORMAT", "image format is not supported") from None
    if width > MAX_SIDE or height > MAX_SIDE:
        raise V3Error("IMAGE_EXCEEDS_MAX_RESOLUTION",
                      f"image is {width}x{height}, over {MAX_SIDE}x{MAX_SIDE}")
    return data


async def upscale(request: web.Request) -> web.Response:
    emu = request.app[EMULATOR]
    emu.requests["submit"] += 1
    key = _key(request)
    emu.inject("submit")
    try:
        body = UpscaleBody.model_validate_json(await request.read())
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(map(str, err["loc"])) or "body"
        raise V3Error("INVALID_REQUEST_BODY", f"{where}: {err['msg']}") from None
    data = _decode_image(body.request.image_base64)
    s = emu.settings
    task = Task(
        task_id=str(uuid.uuid4()), key=key, model=body.request.model_name,
        factor=body.request.scale_factor, image_type=body.extra.response_image_type, image=data,
        queue_delay=s.queue_delay, process_delay=s.process_delay,
        fail_reason=s.fail_reason if s.fail_rate and emu.rng.random() < s.fail_rate else None,
    )
    emu.tasks.add(task)
    if body.extra.webhook and s.webhooks:
        job = asyncio.create_task(_webhook(emu, task, str(body.extra.webhook.url), _base(request)))
        emu.deliveries.add(job)
        job.add_done_callback(emu.deliveries.discard)
    return _json({"task_id": task.task_id})


def _ms(t: float | None) -> str:
    return str(int(t * 1000)) if t else "0"


def _base(request: web.Request) -> str:
    """Where image URLs point: the configured public URL, or the address the request came to."""
    return request.app[EMULATOR].settings.public_url or f"{request.scheme}://{request.host}"


async def result_body(emu: Emulator, task: Task, base: str) -> dict:
    """The task-result document of `task` now; also the payload of its webhook event."""
    now = time.time()
    status = await task.settle(now)
    emu.tasks.recount(task)  # the input may have become a result
    done = status in FINAL
    images = []
    if status == "TASK_STATUS_SUCCEED":
        images.append({
            "image_url": f"{base.rstrip('/')}/images/{task.task_id}.{task.image_type}",
            "image_url_ttl": emu.settings.image_url_ttl,
            "image_type": task.image_type,
            "nsfw_detection_result": None,
        })
    return {
        "extra": {
            "seed": "",
            "enable_nsfw_detection": False,
            "debug_info": {
                "request_info": "",
                "submit_time_ms": _ms(task.submitted),
                "execute_time_ms": _ms(task.executes if now >= task.executes else None),
                "complete_time_ms": _ms(task.completes if done else None),
            },
        },
        "task": {
            "task_id": task.task_id,
            "task_type": "UPSCALE",
            "status": status,
            "reason": (task.fail_reason or "") if status == "TASK_STATUS_FAILED" else "",
            "eta": 0 if done else math.ceil(task.completes - now),
            "progress_percent": 0,
        },
        "images": images,
        "videos": [],
        "audios": [],
    }


async def task_result(request: web.Request) -> web.Response:
    emu = request.app[EMULATOR]
    emu.requests["result"] += 1
    key = _key(request)
    emu.inject("result")
    task = emu.tasks.get(request.query.get("task_id", ""))
    if task is None or (emu.settings.api_keys and task.key != key):
        raise V3Error("TASK_NOT_FOUND", "task not found")
    return _json(await result_body(emu, task, _base(request)))


async def _webhook(emu: Emulator, task: Task, url: str, base: str) -> None:
    """At the task's completion, settle it (nobody may poll) and POST the result event to `url`,
    retrying a non-2xx answer, a timeout or a connection error with a doubling backoff."""
    # a loop, not one sleep: the loop's clock may wake us a hair before time.time() says it's done
    while (wait := task.completes - time.time()) > 0:
        await asyncio.sleep(wait)
    event = {"event_type": "ASYNC_TASK_RESULT", "payload": await result_body(emu, task, base)}
    data = orjson.dumps(event)  # built once: every attempt sends the same event
    assert emu.http is not None
    for attempt in range(WEBHOOK_ATTEMPTS):
        if attempt:
            await asyncio.sleep(emu.settings.webhook_retry_delay * 2 ** (attempt - 1))
        emu.requests["webhook"] += 1
        outcome: int | str
        try:
            async with emu.http.post(url, data=data, timeout=WEBHOOK_TIMEOUT,
                                     headers={"Content-Type": "application/json"}) as resp:
                outcome = resp.status
        except (aiohttp.ClientError, TimeoutError) as e:
            outcome = type(e).__name__
        emu.webhook_calls.append((url, outcome))
        if isinstance(outcome, int) and 200 <= outcome < 300:
            return


async def image(request: web.Request) -> web.Response:
    emu = request.app[EMULATOR]
    emu.requests["image"] += 1
    emu.inject("image")
    task = emu.tasks.get(request.match_info["task_id"])
    if task is None or request.match_info["ext"] != task.image_type:
        raise web.HTTPNotFound(text="no such image")
    if time.time() > task.completes + emu.settings.image_url_ttl:
        raise web.HTTPForbidden(text="Request has expired")
    if task.result is None:
        raise web.HTTPNotFound(text="no such image")
    return web.Response(body=task.result, content_type=CONTENT_TYPES[task.image_type])


def sweeping(key: web.AppKey):
    """A cleanup_ctx that sweeps an emulator's state (`app[key].sweep(now)`) every SWEEP_EVERY s."""

    async def sweeper(app: web.Application):
        async def loop() -> None:
            while True:
                await asyncio.sleep(SWEEP_EVERY)
                app[key].sweep(time.time())

        job = asyncio.create_task(loop())
        yield
        job.cancel()

    return sweeper


async def _webhooks(app: web.Application):
    """One client session for all webhooks; deliveries still pending at shutdown are dropped."""
    emu = app[EMULATOR]
    async with aiohttp.ClientSession() as emu.http:
        yield
        pending = list(emu.deliveries)
        for job in pending:
            job.cancel()
        # wait for them, so none is left to touch the closed session or the closed loop
        await asyncio.gather(*pending, return_exceptions=True)
    emu.http = None


def create_emulator_app(settings: EmulatorSettings | None = None) -> web.Application:
    settings = settings or EmulatorSettings()
    app = web.Application(middlewares=[v3_errors], client_max_size=48 * 1024 * 1024)
    app[EMULATOR] = Emulator(settings, rng=random.Random(settings.seed))
    app.cleanup_ctx.append(sweeping(EMULATOR))
    app.cleanup_ctx.append(_webhooks)
    app.router.add_post("/v3/async/upscale", upscale)
    app.router.add_get("/v3/async/task-result", task_result)
    app.router.add_get(r"/images/{task_id}.{ext:png|jpeg|webp}", image)
    return app
