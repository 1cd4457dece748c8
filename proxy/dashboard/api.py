"""The data behind the dashboard, for scripts: `GET /_proxy/usage` (JSON, or CSV with
`format=csv`), `GET /_proxy/usage/clients/{fingerprint}`, the admin API for labels,
`PUT /_proxy/clients/{fingerprint}/label`, and, with a legacy V2, the migration:
`GET /_proxy/migration` (`?client=` for one), `PUT /_proxy/clients/{fingerprint}/stage` and the
shadow comparisons' images. Each reads or writes through proxy/usage/view.py (the usage store) or
proxy/migration/view.py (the router and the migration store), as the pages do: the page, its JSON
and its CSV can never disagree."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime

import orjson
import structlog
from aiohttp import web

from proxy.dashboard import auth
from proxy.keys import METRICS, MIGRATION_STORE, RESULTS, ROUTER, USAGE
from proxy.migration import view as migration_view
from proxy.migration.stages import STAGES, Rule
from proxy.usage import view
from proxy.usage.tally import OTHER, UNIDENTIFIED

log = structlog.get_logger("proxy")
# a key fingerprint (proxy/fingerprint.py: 16 hex digits), or one of the usage store's buckets
_FINGERPRINT = re.compile(r"[0-9a-f]{16}")
LABEL_MAX = 80
WHY_MAX = 200  # a stage change's reason, as the dashboard shows it
STAGE_FIELDS = ("stage", "percent", "allow_route", "why")
_SHADOW_ID = re.compile(r"[0-9a-f]{32}")
NO_V2 = "No legacy V2 is configured (UPSCALE_PROXY_V2_UPSTREAM): every call is translated, no client has a stage."


def valid_client(name: str) -> bool:
    return bool(_FINGERPRINT.fullmatch(name)) or name in (UNIDENTIFIED, OTHER)


def json_response(doc: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def bad_request(parameter: str, message: str) -> web.Response:
    return json_response({"error": "bad request", "parameter": parameter, "message": message}, 400)


def not_found(message: str) -> web.Response:
    return json_response({"error": "not found", "message": message}, 404)


def context(request: web.Request) -> view.Context:
    """The usage views' context; with a legacy V2, each row carries its client's migration rule."""
    ctx = request.app[USAGE].context()
    return replace(ctx, stages=migration_view.stage_of(request.app[ROUTER])) if ROUTER in request.app else ctx


def filters(request: web.Request) -> view.Filters | web.Response:
    """The query's filters, or the 400 that names the parameter."""
    try:
        return view.Filters.from_query(request.query)
    except view.BadFilter as e:
        return bad_request(str(e).partition(":")[0], str(e))


@auth.api
async def usage(request: web.Request) -> web.Response:
    f = filters(request)
    if isinstance(f, web.Response):
        return f
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "csv"):
        return bad_request("format", "format: json or csv")
    table = await view.clients(request.app[USAGE].store, context(request), f)
    if fmt == "json":
        return json_response(table)
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    return web.Response(text=view.as_csv(table), content_type="text/csv", charset="utf-8", headers={
        "Content-Disposition": f'attachment; filename="v2-usage-{f.days}d-{day}.csv"', "Cache-Control": "no-store"})


@auth.api
async def usage_client(request: web.Request) -> web.Response:
    name = request.match_info["fingerprint"]
    f = filters(request)
    if isinstance(f, web.Response):
        return f
    doc = await view.client(request.app[USAGE].store, context(request), name, f.days) if valid_client(name) else None
    if doc is None:
        return not_found("no such client in the usage store")
    return json_response(doc)


@auth.api(cookie=False)  # scripts only: the page's form posts with a CSRF token (pages.set_label)
async def put_label(request: web.Request) -> web.Response:
    name = request.match_info["fingerprint"]
    try:
        doc = await request.json(loads=orjson.loads)
    except ValueError:
        return bad_request("body", 'a JSON object: {"label": "..."}')
    if not isinstance(doc, dict) or not isinstance(doc.get("label", 0), str | None):  # a missing label is no removal
        return bad_request("label", "label: a string, or null to remove it")
    problem = await set_label(request, name, doc.get("label"), via="bearer")
    if problem:
        return bad_request(*problem)
    return json_response({"client": name, "label": (doc.get("label") or "").strip()})


async def set_label(request: web.Request, name: str, label: str | None, via: str) -> tuple[str, str] | None:
    """Name a client (empty or None removes its name), audited; or (parameter, why not)."""
    if not valid_client(name):
        return "fingerprint", "fingerprint: 16 hex digits (as logged), 'unidentified' or 'other'"
    label = (label or "").strip()
    if len(label) > LABEL_MAX or not label.isprintable():
        return "label", f"label: at most {LABEL_MAX} printable characters"
    await request.app[USAGE].store.set_label(name, label or None)
    # who: only the admin token can get here; the address and how it was shown are what we know
    log.warning("admin.label_set", client=request.remote, via=via, fingerprint=name, label=label or None)
    return None


async def count_clients(app: web.Application) -> None:
    """upscale_proxy_clients{readiness}: the clients by readiness, as the overview counts them by
    default (its 30 days); recomputed every minute (proxy/app.py)."""
    u = app[USAGE]
    table = await view.clients(u.store, u.context(), view.Filters())
    app[METRICS].set_clients_by_readiness(table["totals"]["by_readiness"])


@auth.api
async def migration(request: web.Request) -> web.Response:
    """The migration as its views show it; `?client=` one client's part of it."""
    if ROUTER not in request.app:
        return not_found(NO_V2)
    router, store = request.app[ROUTER], request.app[MIGRATION_STORE]
    name = request.query.get("client")
    if name is not None:
        if not migration_view.has_stage(name):
            return bad_request("client", "client: a key fingerprint, 16 hex digits (as logged)")
        return json_response(await migration_view.client(router, store, name))
    seen = [c.client for c in await request.app[USAGE].store.clients()]
    return json_response(await migration_view.migration(router, store, seen))


@auth.api(cookie=False)
async def delete_v2_gone(request: web.Request) -> web.Response:
    """V2 answers again after it was taken to be gone (falling forward): clients go back to their
    stages. `?why=` is kept with the event."""
    if ROUTER not in request.app:
        return not_found(NO_V2)
    why = request.query.get("why", "")[:WHY_MAX]
    by = f"admin@{request.remote or 'unknown'} (API)"
    cleared = await request.app[ROUTER].v2_back(by=by, why=why if why.isprintable() else "")
    return json_response({"v2_gone": None, "cleared": cleared})


@auth.api(cookie=False)  # scripts only: the page's form posts with a CSRF token (pages.set_stage)
async def put_stage(request: web.Request) -> web.Response:
    if ROUTER not in request.app:
        return not_found(NO_V2)
    try:
        doc = await request.json(loads=orjson.loads)
    except ValueError:
        return bad_request("body", 'a JSON object: {"stage": "shadow", "why": "..."}')
    try:
        rule = await change_stage(request, request.match_info["fingerprint"], doc, via="API")
    except BadStage as e:
        return bad_request(e.parameter, e.message)
    return json_response({"client": request.match_info["fingerprint"], **rule.to_doc()})


class BadStage(ValueError):
    """A stage change the API can't take: the field, and why."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter, self.message = parameter, message


def stage_rule(doc: object, current: Rule) -> tuple[Rule | None, str]:
    """The rule a change asks for (None: back to the file's rule) and its reason. Unsaid, a
    canary's percent is required, `allow_route` stays as it is, and a rollback's hold stays (the
    proxy won't promote the client on its own before it ends). Raises BadStage."""
    if not isinstance(doc, dict):
        raise BadStage("body", 'a JSON object: {"stage": "shadow", "why": "..."}')
    for key in doc:
        if key not in STAGE_FIELDS:
            raise BadStage(str(key)[:40], f"{str(key)[:40]}: not a field (stage, percent, allow_route, why)")
    why = doc.get("why", "")
    if not isinstance(why, str) or len(why.strip()) > WHY_MAX or not why.strip().isprintable():
        raise BadStage("why", f"why: at most {WHY_MAX} printable characters")
    stage = doc.get("stage", "missing")
    if stage is None:
        return None, why.strip()
    if stage not in STAGES:
        raise BadStage("stage", f"stage: {', '.join(STAGES)}, or null to go back to the migration file's rule")
    percent = doc.get("percent", None if stage == "canary" else 0)
    if type(percent) is not int or not 0 <= percent <= 100:
        raise BadStage("percent", "percent: a whole number from 0 to 100 (a canary's share of calls on V3)")
    allow_route = doc.get("allow_route", current.allow_route)
    if not isinstance(allow_route, bool):
        raise BadStage("allow_route", "allow_route: true or false")
    return Rule(stage, percent, allow_route, hold_until=current.hold_until), why.strip()


async def change_stage(request: web.Request, name: str, doc: object, via: str) -> Rule:
    """A client's stage changed by the operator (the API, the dashboard's form): the rule it is
    under now. The router logs and stores the change (`migration.stage_changed`) with who and why."""
    if not migration_view.has_stage(name):
        raise BadStage("fingerprint", "fingerprint: a key fingerprint, 16 hex digits (as logged)")
    router = request.app[ROUTER]
    rule, why = stage_rule(doc, router.rule(name))
    # who: only the admin token gets here; the address and how it was shown are what we know
    return await router.change(name, rule, by=f"admin@{request.remote} ({via})", why=why, source="admin")


@auth.api
async def shadow_image(request: web.Request) -> web.StreamResponse:
    """One of a shadow comparison's images (V2's, the translation's, the heat map), while the blob
    store keeps it (proxy/migration/service.py IMAGES_TTL)."""
    shadow_id, image = request.match_info["id"], request.match_info["image"]
    png = None
    if _SHADOW_ID.fullmatch(shadow_id) and image in migration_view.IMAGES:
        png = await request.app[RESULTS].get(f"shadow-{shadow_id}-{image}.png")
    if png is None:
        return not_found("no such image: the comparison kept none, or they have expired")
    return web.Response(body=png, content_type="image/png",
                        headers={"Cache-Control": "private, max-age=86400", "X-Content-Type-Options": "nosniff"})
