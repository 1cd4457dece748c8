"""The data behind the dashboard, for scripts: `GET /_proxy/usage` (JSON, or CSV with
`format=csv`), `GET /_proxy/usage/clients/{fingerprint}`, and the admin API for labels,
`PUT /_proxy/clients/{fingerprint}/label`. Each reads or writes through proxy/usage/view.py and the
usage store, as the pages do: the page, its JSON and its CSV can never disagree."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import orjson
import structlog
from aiohttp import web

from proxy.dashboard import auth
from proxy.keys import METRICS, USAGE
from proxy.usage import view
from proxy.usage.tally import OTHER, UNIDENTIFIED

log = structlog.get_logger("proxy")
# a key fingerprint (proxy/fingerprint.py: 16 hex digits), or one of the usage store's buckets
_FINGERPRINT = re.compile(r"[0-9a-f]{16}")
LABEL_MAX = 80


def valid_client(name: str) -> bool:
    return bool(_FINGERPRINT.fullmatch(name)) or name in (UNIDENTIFIED, OTHER)


def json_response(doc: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def bad_request(parameter: str, message: str) -> web.Response:
    return json_response({"error": "bad request", "parameter": parameter, "message": message}, 400)


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
    u = request.app[USAGE]
    table = await view.clients(u.store, u.context(), f)
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
    u = request.app[USAGE]
    doc = await view.client(u.store, u.context(), name, f.days) if valid_client(name) else None
    if doc is None:
        return json_response({"error": "not found", "message": "no such client in the usage store"}, 404)
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
