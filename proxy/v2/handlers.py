"""The /v2 handlers: parse, translate, call upstream (or the composer), reply. Errors are V2Error."""

from __future__ import annotations

import re

from aiohttp import web

from proxy.compose.tasks import is_composed_id
from proxy.errors import V2Code, V2Error
from proxy.keys import COMPOSER, FINGERPRINT, LOG_FIELDS, MAPPINGS, POLICIES, SETTINGS, V3
from proxy.mappings import Mappings
from proxy.translate.plan import V3_URL_TTL, Plan, Policies, plan_upscale
from proxy.translate.progress import progress_data
from proxy.v2.auth import api_key
from proxy.v2.body import split_image
from proxy.v2.image import ImageInfo, probe
from proxy.v2.models import V2_FIELDS, V2UpscaleOptions, validate_options
from proxy.v2.reply import v2_reply
from proxy.v3.payload import UpscaleBody

TASK_ID = re.compile(r"[A-Za-z0-9_.\-]{1,128}")


def _image_url(request: web.Request, task_id: str) -> str:
    base = request.app[SETTINGS].public_url or str(request.url.origin())
    return f"{base}/v2/images/{task_id}.png"


def plan_body(doc: dict, image_b64: memoryview | bytes, mappings: Mappings, policies: Policies,
              faces_available: bool = False) -> tuple[V2UpscaleOptions, ImageInfo, memoryview | bytes, Plan]:
    """A parsed V2 upscale body -> (its options, the image, the base64 to forward, the Plan)."""
    options = validate_options(doc)
    image, image_b64 = probe(image_b64)
    return options, image, image_b64, plan_upscale(options, image, mappings, policies, faces_available)


async def upscale(request: web.Request) -> web.Response:
    app = request.app
    key = api_key(request)
    doc, image_b64 = split_image(await request.read())
    log = request[LOG_FIELDS]
    log["fields"] = [name for name in V2_FIELDS if doc.get(name) is not None]
    options, _, image_b64, plan = plan_body(doc, image_b64, app[MAPPINGS], app[POLICIES],
                                            app[COMPOSER].faces.available)
    log.update(features=dict(plan.decisions), warnings=list(plan.warnings))
    if plan.direct:
        if plan.rgb_input:
            image_b64 = await app[COMPOSER].rgb_base64(image_b64)
        body = UpscaleBody(plan.direct.model, plan.direct.scale_factor, image_b64)
        log["path_taken"] = "direct"
        task_id, log["upstream_status"] = await app[V3].submit(body, key)
    else:
        log["path_taken"] = "composed"
        task_id, log["v3_task_ids"] = await app[COMPOSER].submit(
            plan, image_b64, key, request[FINGERPRINT], ttl=options.img_expire_ttl or V3_URL_TTL)
    log["task_id"] = task_id
    return v2_reply(data={"task_id": task_id, "warn": plan.warn})


async def progress(request: web.Request) -> web.Response:
    app = request.app
    key = api_key(request)
    task_id = request.query.get("task_id", "")
    if not task_id:
        raise V2Error(V2Code.INVALID_JSON, "task_id: query parameter required")
    if not TASK_ID.fullmatch(task_id):
        raise V2Error(V2Code.TASK_ID_NOT_EXIST, "task_id: no such task")
    log = request[LOG_FIELDS]
    log["task_id"] = task_id
    if is_composed_id(task_id):
        log["path_taken"] = "composed"
        data = await app[COMPOSER].progress(task_id, key, request[FINGERPRINT], _image_url(request, task_id))
        if data is not None:
            return v2_reply(data=data)
    log["path_taken"] = "direct"
    result, log["upstream_status"] = await app[V3].task_result(task_id, key)
    return v2_reply(data=progress_data(result, app[MAPPINGS].task_status))


async def image(request: web.Request) -> web.Response:
    """A composed task's PNG, while its img_expire_ttl lasts; then a 404 with a V2 body."""
    task_id = request.match_info["task_id"]
    request[LOG_FIELDS].update(path_taken="composed", task_id=task_id)
    png = await request.app[COMPOSER].image(task_id) if is_composed_id(task_id) else None
    if png is None:
        raise V2Error(V2Code.TASK_ID_NOT_EXIST, "no such image, or it has expired", http_status=404)
    return web.Response(body=png, content_type="image/png")
