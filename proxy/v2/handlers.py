"""The /v2 handlers: parse, translate, call upstream (or the composer), reply. Errors are V2Error."""

from __future__ import annotations

import ipaddress
import re

from aiohttp import web
from yarl import URL

from proxy.compose.task import is_composed_id
from proxy.envtypes import host_name
from proxy.errors import StoreUnavailable, V2Code, V2Error
from proxy.keys import (
    AUDIT,
    CALLER,
    DIRECT,
    LAST_KNOWN,
    MAPPINGS,
    METRICS,
    SETTINGS,
    TASKS,
    TRANSLATOR,
)
from proxy.redact import redact
from proxy.translate.progress import progress_data
from proxy.v2.auth import api_key
from proxy.v2.body import split_image
from proxy.v2.edge import log_v3_failure
from proxy.v2.reply import v2_reply
from proxy.v3.errors import V3Error

TASK_ID = re.compile(r"[A-Za-z0-9_.\-]{1,128}")


# a Host header: a name or an IPv4 address, or a bracketed IPv6 one; then maybe a port
_HOST = re.compile(r"(?P<host>[^:\[\]]+|\[(?P<ipv6>[0-9A-Fa-f:.]+)\])(?::(?P<port>[0-9]{1,5}))?")


def _image_url(request: web.Request, task_id: str) -> str:
    """Where a composed task's image is: under UPSCALE_PROXY_PUBLIC_URL when set, else under the proxy
    as the request reached it."""
    base = request.app[SETTINGS].public_url or _origin(request)
    return f"{base}/v2/images/{task_id}.png"


def _origin(request: web.Request) -> str:
    """The Host header if it is a valid host[:port], else the address the request came to; never
    what a malformed Host says (it would be reflected into the URL)."""
    host, port = _host_header(request.headers.get("Host", "")) or _local_address(request)
    return str(URL.build(scheme=request.scheme, host=host, port=port))


def _host_header(value: str) -> tuple[str, int | None] | None:
    """(host, port) of a Host header that is a valid host[:port], else None."""
    m = _HOST.fullmatch(value) if len(value) <= 261 else None  # 253 for a name, 8 for a port
    if m is None or (m["port"] and not 0 < int(m["port"]) < 65536):
        return None
    try:
        host = str(ipaddress.IPv6Address(m["ipv6"])) if m["ipv6"] else host_name(m["host"])
    except ValueError:
        return None
    return host, int(m["port"]) if m["port"] else None


def _local_address(request: web.Request) -> tuple[str, int | None]:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        return sockname[0], sockname[1]
    settings = request.app[SETTINGS]  # not a TCP socket: where the proxy was told to listen
    return settings.host, settings.port


async def upscale(request: web.Request) -> web.Response:
    app = request.app
    key = api_key(request)
    doc, image_b64, head = split_image(await request.read())
    audit = request[AUDIT]
    translation = app[TRANSLATOR].translate(doc, image_b64, head)
    plan, image_b64, audit.fields, audit.shape = translation.plan, translation.image_b64, translation.fields, \
        translation.shape
    audit.features, audit.warnings = dict(plan.decisions), list(plan.warnings)
    if plan.direct:
        if plan.v3_input == "pixels":
            image_b64 = await app[TASKS].v3_input(image_b64, plan.read)
        audit.path_taken = "direct"
        task_id, audit.upstream_status = await app[DIRECT].submit(plan.direct, image_b64, key,
                                                                  request[CALLER].fingerprint)
        audit.v3_jobs = 1
    else:
        audit.path_taken = "composed"
        task_id, audit.v3_task_ids = await app[TASKS].submit(plan, image_b64, key, request[CALLER].fingerprint)
        audit.v3_jobs = sum(len(branch.v3_jobs) for branch in plan.branches)
    audit.task_id = task_id
    return v2_reply(data={"task_id": task_id, "warn": plan.warn})


async def progress(request: web.Request) -> web.Response:
    app = request.app
    key = api_key(request)
    task_id = request.query.get("task_id", "")
    if not task_id:
        raise V2Error(V2Code.INVALID_JSON, "task_id: query parameter required")
    if not TASK_ID.fullmatch(task_id):
        raise V2Error(V2Code.TASK_ID_NOT_EXIST, "task_id: no such task")
    audit = request[AUDIT]
    audit.task_id = task_id
    fingerprint = request[CALLER].fingerprint
    try:
        data = await _progress_data(request, task_id, key, fingerprint)
    except (V3Error, StoreUnavailable) as e:
        if isinstance(e, V3Error) and not e.transient:
            raise
        # V3 or the store can't be reached now: the task's last known state, never the fault
        if isinstance(e, V3Error):
            log_v3_failure(request, e)
        why = redact(f"V3: {e}", key) if isinstance(e, V3Error) else e.msg
        data, audit.ride_through = app[LAST_KNOWN].stand_in(task_id, fingerprint, why)
        audit.upstream_status = e.status if isinstance(e, V3Error) else None
        audit.msg = why
        app[METRICS].poll_ride_through.labels(audit.ride_through).inc()
    else:
        app[LAST_KNOWN].answered(task_id, fingerprint, data)
    return v2_reply(data=data)


async def _progress_data(request: web.Request, task_id: str, key: str, fingerprint: str | None) -> dict:
    """The task's V2 progress: a composed task's from the store, a direct task's from V3's result."""
    app, audit = request.app, request[AUDIT]
    if is_composed_id(task_id):
        audit.path_taken = "composed"
        data = await app[TASKS].progress(task_id, key, fingerprint, _image_url(request, task_id))
        if data is not None:
            return data
    audit.path_taken = "direct"
    result, audit.upstream_status, audit.poll_cache = await app[DIRECT].result(task_id, key, fingerprint)
    app[METRICS].count_poll(audit.poll_cache)
    return progress_data(result, app[MAPPINGS].task_status, key=key)


async def image(request: web.Request) -> web.Response:
    """A composed task's PNG, while its img_expire_ttl lasts; then a 404 with a V2 body."""
    task_id = request.match_info["task_id"]
    request[AUDIT].path_taken, request[AUDIT].task_id = "composed", task_id
    png = await request.app[TASKS].image(task_id, request[CALLER].fingerprint) if is_composed_id(task_id) else None
    if png is None:
        raise V2Error(V2Code.TASK_ID_NOT_EXIST, "no such image, or it has expired", http_status=404)
    return web.Response(body=png, content_type="image/png")
