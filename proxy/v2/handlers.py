"""The /v2 handlers: parse, translate, call upstream (or the composer), reply. Errors are V2Error.

With a legacy V2 (UPSCALE_PROXY_V2_UPSTREAM), the router first says which side serves the call
(proxy/migration/router.py): the legacy side forwards it to V2 as sent and passes V2's reply back;
the V3 side is everything else here."""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple

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
    LEGACY,
    MAPPINGS,
    METRICS,
    MIGRATION,
    ROUTER,
    SETTINGS,
    TASKS,
    TRANSLATOR,
)
from proxy.migration.legacy import LegacyGone, LegacyUnavailable
from proxy.migration.router import ROUTE_HEADER
from proxy.redact import redact
from proxy.translate.progress import failed_progress, progress_data
from proxy.v2.audit_record import AuditRecord
from proxy.v2.auth import api_key
from proxy.v2.body import split_image
from proxy.v2.edge import log_v3_failure
from proxy.v2.reply import v2_reply
from proxy.v2.translation import Translation
from proxy.v3.errors import V3Error

TASK_ID = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
TRANSIENT_V2_CODES = frozenset({-1, 5, 9})  # V2's internal error, unavailable, timeout


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
    router = app.get(ROUTER)
    if router is not None:
        side, request[AUDIT].stage = router.submission(request[CALLER].fingerprint, request.headers.get(ROUTE_HEADER))
        if side == "legacy" and (served := await legacy_upscale(request)) is not None:
            return served
    audit = request[AUDIT]
    translation = app[TRANSLATOR].translate(*split_image(await request.read()))
    plan = translation.plan
    _audit_plan(audit, translation)
    audit.path_taken = plan.path
    done = await submit_translation(app, translation, key, request[CALLER].fingerprint)
    audit.task_id, audit.upstream_status, audit.v3_task_ids, audit.v3_jobs = done
    if router is not None:
        await router.took(done.task_id, "v3")
    return v2_reply(data={"task_id": done.task_id, "warn": plan.warn})


class Submitted(NamedTuple):
    task_id: str
    upstream_status: int | None  # the direct path's V3 status
    v3_task_ids: list[str] | None  # a composed task's first V3 jobs
    v3_jobs: int  # every V3 job the task costs, its later passes counted


async def submit_translation(app: web.Application, translation: Translation, key: str,
                             fingerprint: str | None) -> Submitted:
    """The translation's submission (a client's, or a shadow's): one V3 job, or a composed task."""
    plan, image_b64 = translation.plan, translation.image_b64
    if plan.direct:
        if plan.v3_input == "pixels":
            image_b64 = await app[TASKS].v3_input(image_b64, plan.read)
        task_id, status = await app[DIRECT].submit(plan.direct, image_b64, key, fingerprint)
        return Submitted(task_id, status, None, 1)
    task_id, firsts = await app[TASKS].submit(plan, image_b64, key, fingerprint)
    return Submitted(task_id, None, firsts, sum(len(branch.v3_jobs) for branch in plan.branches))


async def legacy_upscale(request: web.Request) -> web.Response | None:
    """The legacy side of a submission: V2's own reply, as it came. None when V2 turns out to be
    gone: the router falls forward, and the call is translated instead."""
    app, audit = request.app, request[AUDIT]
    body = await request.read()
    try:
        reply = await app[LEGACY].call(request, body)
    except LegacyGone as e:
        await app[ROUTER].fall_forward(str(e))
        return None
    except LegacyUnavailable as e:
        raise V2Error(V2Code.HOST_UNAVAILABLE, f"legacy V2 unreachable: {e}") from e
    audit.served_by, audit.path_taken, audit.v2_code = "legacy", "legacy", reply.code
    task_id = (reply.data or {}).get("task_id")
    if reply.code == 0 and isinstance(task_id, str) and TASK_ID.fullmatch(task_id):
        audit.task_id = task_id
        await app[ROUTER].took(task_id, "legacy")
        if audit.stage in ("shadow", "canary"):  # V2 serves it: the translation runs beside it, to compare
            app[MIGRATION].shadows.start(body, api_key(request), request[CALLER].fingerprint, task_id)
    audit_translation(app, body, audit)
    return reply.response()


def audit_translation(app: web.Application, body: bytes, audit: AuditRecord) -> None:
    """What the translation would make of a body V2 served: its features and shape, for the audit
    and the usage store, so a legacy client's readiness is known before it moves."""
    try:
        translation = app[TRANSLATOR].translate(*split_image(body))
    except V2Error as e:
        if e.feature is not None:
            audit.features = {e.feature: "refused"}
        return
    _audit_plan(audit, translation)


def _audit_plan(audit: AuditRecord, translation: Translation) -> None:
    audit.fields, audit.shape = translation.fields, translation.shape
    audit.features, audit.warnings = dict(translation.plan.decisions), list(translation.plan.warnings)


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
    router = app.get(ROUTER)
    if router is not None and await router.poll(task_id, fingerprint, request.headers.get(ROUTE_HEADER)) == "legacy":
        return await legacy_progress(request, task_id)
    try:
        data = await read_progress(app, task_id, key, fingerprint, _image_url(request, task_id), audit)
    except (V3Error, StoreUnavailable) as e:
        if isinstance(e, V3Error) and not e.transient:
            raise
        # V3 or the store can't be reached now: the task's last known state, never the fault
        if isinstance(e, V3Error):
            log_v3_failure(request, e)
        audit.upstream_status = e.status if isinstance(e, V3Error) else None
        data = ride_through(request, task_id, redact(f"V3: {e}", key) if isinstance(e, V3Error) else e.msg)
    else:
        app[LAST_KNOWN].answered(task_id, fingerprint, data)
        audit.task_status = data["status"]
    return v2_reply(data=data)


def ride_through(request: web.Request, task_id: str, why: str) -> dict:
    """The data of a poll that could not learn its task's state (proxy/v2/last_known.py)."""
    audit = request[AUDIT]
    data, audit.ride_through = request.app[LAST_KNOWN].stand_in(task_id, request[CALLER].fingerprint, why)
    audit.msg = why
    request.app[METRICS].poll_ride_through.labels(audit.ride_through).inc()
    return data


async def legacy_progress(request: web.Request, task_id: str) -> web.Response:
    """The legacy side of a poll: V2's own reply; through a V2 outage, the task's last known state."""
    app, audit = request.app, request[AUDIT]
    audit.served_by, audit.path_taken = "legacy", "legacy"
    try:
        reply = await app[LEGACY].call(request, None)
    except LegacyGone as e:
        await app[ROUTER].fall_forward(str(e))
        raise V2Error(V2Code.TASK_ID_NOT_EXIST, "the legacy V2 that took this task is gone: submit it again") from e
    except LegacyUnavailable as e:
        return v2_reply(data=ride_through(request, task_id, f"legacy V2: {e}"))
    msg = str(reply.doc["msg"])
    if reply.code in TRANSIENT_V2_CODES:  # V2 itself could not say, this time: as through any outage
        return v2_reply(data=ride_through(request, task_id, f"legacy V2: code {reply.code} {msg}"))
    audit.v2_code = reply.code
    if reply.data is None:  # V2's own errors had data: null, which SDK loops crash on
        return v2_reply(reply.code, msg, failed_progress(msg))
    if reply.code == 0:
        app[LAST_KNOWN].answered(task_id, request[CALLER].fingerprint, reply.data)
    return reply.response()


async def read_progress(app: web.Application, task_id: str, key: str, fingerprint: str | None, image_url: str,
                        audit: AuditRecord | None = None) -> dict:
    """The task's V2 progress: a composed task's from the store, a direct task's from V3's result
    (a client's poll, noted in its `audit`, or a shadow's, which is no client's and noted nowhere)."""
    if is_composed_id(task_id):
        if audit is not None:  # said before the call: a call that fails took this path
            audit.path_taken = "composed"
        data = await app[TASKS].progress(task_id, key, fingerprint, image_url)
        if data is not None:
            return data
    if audit is not None:
        audit.path_taken = "direct"
    result, status, outcome = await app[DIRECT].result(task_id, key, fingerprint)
    if audit is not None:
        audit.upstream_status, audit.poll_cache = status, outcome
        app[METRICS].count_poll(outcome)
    return progress_data(result, app[MAPPINGS].task_status, key=key)


async def image(request: web.Request) -> web.Response:
    """A composed task's PNG, while its img_expire_ttl lasts; then a 404 with a V2 body."""
    task_id = request.match_info["task_id"]
    request[AUDIT].path_taken, request[AUDIT].task_id = "composed", task_id
    png = await request.app[TASKS].image(task_id, request[CALLER].fingerprint) if is_composed_id(task_id) else None
    if png is None:
        raise V2Error(V2Code.TASK_ID_NOT_EXIST, "no such image, or it has expired", http_status=404)
    return web.Response(body=png, content_type="image/png")
