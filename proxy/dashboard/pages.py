"""The dashboard's pages: each handler reads one function of proxy/usage/view.py (the one the JSON
and CSV read) and, with a legacy V2, of proxy/migration/view.py (the one `/_proxy/migration`
reads), and renders it. Filters are query parameters, so every view is a URL to bookmark."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import aiohttp_jinja2
import structlog
from aiohttp import web

from proxy.dashboard import api, auth
from proxy.keys import MIGRATION_STORE, ROUTER, SETTINGS, TRANSLATOR, USAGE
from proxy.migration import view as migration_view
from proxy.migration.stages import STAGES
from proxy.usage import snippets, view

log = structlog.get_logger("proxy")
STATIC = Path(__file__).with_name("static")
_FILES = {p.name: p for p in STATIC.iterdir() if p.is_file()}  # served as they are: nothing else is
NAV = (("Overview", "/_proxy/dashboard", "overview"), ("Clients", "/_proxy/dashboard/clients", "clients"),
       ("Features", "/_proxy/dashboard/features", "features"))
# the pages load only this proxy's own files; uPlot styles its elements through the DOM, which
# style-src does not govern, so no inline style or script is allowed
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin", "Cache-Control": "no-store",
}


def render(request: web.Request, template: str, page: str = "", status: int = 200, **context) -> web.Response:
    context.setdefault("f", None)
    response = aiohttp_jinja2.render_template(template, request, {
        **context, "page": page, "nav": NAV, "periods": view.PERIODS, "csrf": request.app[auth.ADMIN].csrf,
        "path": request.path, "now": datetime.now(UTC), "migrating": ROUTER in request.app, "stages": STAGES},
        status=status)
    response.headers.update(HEADERS)
    return response


async def _form(request: web.Request) -> dict[str, str]:
    """The form's text fields; a body that is no form (multipart without its boundary, ...) is an
    empty one, answered as such, never a 500."""
    try:
        form = await request.post()
    except ValueError:
        return {}
    return {name: value for name, value in form.items() if isinstance(value, str)}


def _filters(request: web.Request, page: str) -> view.Filters | web.Response:
    try:
        return view.Filters.from_query(request.query)
    except view.BadFilter as e:
        return render(request, "error.html", page, 400, title="Bad filter", message=str(e))


@auth.page
async def overview(request: web.Request) -> web.Response:
    f = _filters(request, "overview")
    if isinstance(f, web.Response):
        return f
    store = request.app[USAGE].store
    migration = None
    if ROUTER in request.app:  # the migration's panel: every known client, the last changes
        seen = [c.client for c in await store.clients()]
        migration = await migration_view.migration(request.app[ROUTER], request.app[MIGRATION_STORE], seen,
                                                   events=10, comparisons=0)
    return render(request, "overview.html", "overview", f=f, doc=await view.overview(store, api.context(request), f),
                  migration=migration)


@auth.page
async def clients(request: web.Request) -> web.Response:
    f = _filters(request, "clients")
    if isinstance(f, web.Response):
        return f
    doc = await view.clients(request.app[USAGE].store, api.context(request), f)
    return render(request, "clients.html", "clients", f=f, doc=doc)


@auth.page
async def client(request: web.Request) -> web.Response:
    f = _filters(request, "clients")
    if isinstance(f, web.Response):
        return f
    name = request.match_info["fingerprint"]
    u, ctx = request.app[USAGE], api.context(request)
    doc = await view.client(u.store, ctx, name, f.days) if api.valid_client(name) else None
    if doc is None:
        return render(request, "error.html", "clients", 404, f=f, title="No such client",
                      message="The usage store has never seen this client.")
    # its most frequent body, as V3 code: against the successor URL, else this proxy's /v3 pass-through
    settings, origin = request.app[SETTINGS], str(request.url.origin())
    shape = doc["shapes"][0] if doc["shapes"] else None
    code = snippets.snippets_for(shape["shape"], request.app[TRANSLATOR], settings.successor_url or origin) \
        if shape else []
    guide = settings.deprecation_link if "://" in settings.deprecation_link else origin + settings.deprecation_link
    message = snippets.notice({**doc, "sunset": ctx.sunset}, guide_url=guide, dashboard_url=origin + request.path)
    migration = await migration_view.client(request.app[ROUTER], request.app[MIGRATION_STORE], name) \
        if ROUTER in request.app and migration_view.has_stage(name) else None
    return render(request, "client.html", "clients", f=f, doc=doc, saved=request.query.get("saved"),
                  label_max=api.LABEL_MAX, shape=shape, snippets=code, languages=snippets.LANGUAGES, notice=message,
                  migration=migration, why_max=api.WHY_MAX, staged=request.query.get("staged"))


@auth.page
async def features(request: web.Request) -> web.Response:
    f = _filters(request, "features")
    if isinstance(f, web.Response):
        return f
    doc = await view.features(request.app[USAGE].store, api.context(request), f)
    return render(request, "features.html", "features", f=f, doc=doc)


@auth.page
async def set_label(request: web.Request) -> web.Response:
    """The client page's label form: the session cookie (SameSite=Strict) and the form's CSRF token."""
    name = request.match_info["fingerprint"]
    form = await _form(request)
    if not auth.csrf_ok(request, form.get("csrf")):
        auth.refused(request, "no or wrong CSRF token")
        return render(request, "error.html", "clients", 403, title="Refused",
                      message="The form's token is missing or stale: reload the page and try again.")
    problem = await api.set_label(request, name, form.get("label"), via="dashboard form")
    if problem:
        return render(request, "error.html", "clients", 400, title="Not saved", message=problem[1])
    return auth.see_other(f"/_proxy/dashboard/clients/{name}?saved=1")


@auth.page
async def set_stage(request: web.Request) -> web.Response:
    """The client page's stage form: as the label form (session and CSRF token); the change is the
    API's (api.change_stage), its fields given as a form's text."""
    name = request.match_info["fingerprint"]
    form = await _form(request)
    if not auth.csrf_ok(request, form.get("csrf")):
        auth.refused(request, "no or wrong CSRF token")
        return render(request, "error.html", "clients", 403, title="Refused",
                      message="The form's token is missing or stale: reload the page and try again.")
    if ROUTER not in request.app:
        return render(request, "error.html", "clients", 404, title="No stages", message=api.NO_V2)
    doc: dict = {"stage": form.get("stage") or None, "allow_route": form.get("allow_route") == "on",
                 "why": form.get("why", "")}
    if form.get("percent", "").strip():  # a number field: text, checked as the API checks it
        percent = form["percent"].strip()
        doc["percent"] = int(percent) if percent.isdigit() else percent
    try:
        await api.change_stage(request, name, doc, via="dashboard")
    except api.BadStage as e:
        return render(request, "error.html", "clients", 400, title="Stage not changed", message=e.message)
    return auth.see_other(f"/_proxy/dashboard/clients/{name}?staged=1#stage")


async def login_form(request: web.Request) -> web.Response:
    return render(request, "login.html", next=auth.safe_next(request.query.get("next")))


async def login(request: web.Request) -> web.Response:
    form = await _form(request)
    token, target = form.get("token"), auth.safe_next(form.get("next"))
    if token and request.app[auth.ADMIN].matches(token.strip()):
        response = auth.see_other(target)
        auth.start_session(request, response)
        log.info("admin.login", client=request.remote, via="form")
        return response
    auth.refused(request, "wrong token" if token else "no token")
    return render(request, "login.html", status=401, next=target, error="That is not the admin token.")


async def logout(request: web.Request) -> web.Response:
    response = auth.see_other(auth.LOGIN)
    auth.end_session(response)
    return response


async def static(request: web.Request) -> web.StreamResponse:
    """The vendored assets (uPlot, simple.css, the favicon): public, as the login page needs them."""
    path = _FILES.get(request.match_info["name"])
    if path is None:
        raise web.HTTPNotFound()
    return web.FileResponse(path, headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"})
