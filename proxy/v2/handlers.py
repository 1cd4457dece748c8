"""The /v2 handlers: parse, translate, one upstream call, reply. Errors are raised as V2Error."""

from __future__ import annotations

import re

from aiohttp import web

from proxy.errors import V2Code, V2Error
from proxy.state import LOG_FIELDS, MAPPINGS, V3
from proxy.translate.plan import plan_upscale
from proxy.translate.progress import progress_data
from proxy.v2.auth import api_key
from proxy.v2.body import split_image
from proxy.v2.image import probe
from proxy.v2.models import validate_options
from proxy.v2.reply import v2_reply
from proxy.v3.payload import UpscaleBody

TASK_ID = re.compile(r"[A-Za-z0-9_.\-]{1,128}")


async def upscale(request: web.Request) -> web.Response:
    key = api_key(request)
    doc, image_b64 = split_image(await request.read())
    options = validate_options(doc)
    image, image_b64 = probe(image_b64)
    plan = plan_upscale(options, image, request.app[MAPPINGS])
    job = plan.jobs[0]
    body = UpscaleBody(job.model, job.scale_factor, image_b64)
    task_id, status = await request.app[V3].submit(body, key)
    request[LOG_FIELDS].update(upstream_status=status, task_id=task_id, warn=plan.warn)
    return v2_reply(data={"task_id": task_id, "warn": plan.warn})


async def progress(request: web.Request) -> web.Response:
    key = api_key(request)
    task_id = request.query.get("task_id", "")
    if not task_id:
        raise V2Error(V2Code.INVALID_JSON, "task_id: query parameter required")
    if not TASK_ID.fullmatch(task_id):
        raise V2Error(V2Code.TASK_ID_NOT_EXIST, "task_id: no such task")
    result, status = await request.app[V3].task_result(task_id, key)
    request[LOG_FIELDS].update(upstream_status=status)
    return v2_reply(data=progress_data(result, request.app[MAPPINGS].task_status))
