"""Who may read the dashboard, /_proxy/usage and the admin API: whoever holds the admin token
(UPSCALE_PROXY_ADMIN_TOKEN; unset, `serve` makes one at start and logs the dashboard's URL with it,
as notebook servers do).

The token is accepted three ways:
- `Authorization: Bearer <token>`, on anything here (scripts, the JSON/CSV and the admin API);
- the login form (`/_proxy/login`), which sets a session cookie: HttpOnly, SameSite=Strict,
  Secure over https, holding an HMAC of the token and the time it was issued (never the token);
- `?token=<token>` on a page's URL, which sets the same cookie and redirects to the URL without it,
  so the token leaves the address bar and the history at once.
Tokens are compared in constant time. Each refusal is one `admin.refused` line (the client's
address and the path, never what was sent): pages answer it with a redirect to the login form,
the JSON, CSV and admin API with 401.

Forms that change something (a client's label) carry a CSRF token, an HMAC of the admin token, on
top of the SameSite=Strict cookie: a page from elsewhere can neither send the cookie nor know it.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Literal
from urllib.parse import urlencode

import orjson
import structlog
from aiohttp import web
from pydantic import SecretStr

from proxy.settings import Settings

log = structlog.get_logger("proxy")
COOKIE = "upscale_proxy_session"
SESSION_SECONDS = 12 * 3600  # a login lasts a working day
LOGIN = "/_proxy/login"
HOME = "/_proxy/dashboard"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Via = Literal["bearer", "session"]


class AdminToken:
    """The admin token, and what is derived from it (sessions, the CSRF token), with a clock."""

    def __init__(self, token: str, clock: Callable[[], float] = time.time) -> None:
        self._token = token.encode()
        self._clock = clock

    def matches(self, sent: str) -> bool:
        return hmac.compare_digest(sent.encode("utf-8", "surrogateescape"), self._token)

    def _mac(self, what: str) -> str:
        return hmac.new(self._token, what.encode(), hashlib.sha256).hexdigest()

    def new_session(self) -> str:
        issued = int(self._clock())
        return f"{issued}.{self._mac(f'session {issued}')}"

    def session_valid(self, value: str) -> bool:
        issued, _, mac = value.partition(".")
        if not issued.isdigit() or not hmac.compare_digest(mac.encode(), self._mac(f"session {issued}").encode()):
            return False
        return 0 <= self._clock() - int(issued) < SESSION_SECONDS

    @property
    def csrf(self) -> str:
        return self._mac("csrf")[:32]


ADMIN = web.AppKey("admin_token", AdminToken)


def with_token(settings: Settings) -> tuple[Settings, str | None]:
    """The settings with an admin token: the configured one, else one made now (returned too, to
    be announced once; `serve --workers` hands it to every worker through the environment)."""
    if settings.admin_token is not None and settings.admin_token.get_secret_value():
        return settings, None
    made = secrets.token_urlsafe(32)
    return settings.model_copy(update={"admin_token": SecretStr(made)}), made


def dashboard_url(base: str, token: str) -> str:
    return f"{base}{HOME}?{urlencode({'token': token})}"


def announce(url: str) -> None:
    """The one line that carries a token: a made one, for the operator who set none."""
    log.warning(f"dashboard at {url}", note="the admin token was made for this run: set UPSCALE_PROXY_ADMIN_TOKEN "
                "to keep one across restarts and replicas")


def setup(app: web.Application, settings: Settings) -> None:
    # an app made without `serve` (tests, embedding) and no token configured: a random one, which
    # nobody knows, keeps the pages closed rather than open
    token = settings.admin_token.get_secret_value() if settings.admin_token else ""
    app[ADMIN] = AdminToken(token or secrets.token_urlsafe(32))


def _bearer(request: web.Request) -> str | None:
    scheme, _, rest = request.headers.get("Authorization", "").strip().partition(" ")
    return rest.strip() if scheme.lower() == "bearer" else None


def authorized(request: web.Request, *, cookie: bool = True) -> Via | str:
    """How the request proves it holds the token ("bearer", "session"), or why it does not."""
    admin = request.app[ADMIN]
    sent = _bearer(request)
    if sent is not None:
        return "bearer" if admin.matches(sent) else "wrong token"
    session = request.cookies.get(COOKIE) if cookie else None
    if session is not None:
        return "session" if admin.session_valid(session) else "expired or foreign session"
    return "no token"


def refused(request: web.Request, reason: str) -> None:
    """The audit line of a refusal: who and where, never what was sent."""
    log.warning("admin.refused", client=request.remote, method=request.method, path=request.path, reason=reason)


def start_session(request: web.Request, response: web.StreamResponse) -> None:
    response.set_cookie(COOKIE, request.app[ADMIN].new_session(), path="/_proxy", max_age=SESSION_SECONDS,
                        httponly=True, samesite="Strict", secure=request.secure)


def end_session(response: web.StreamResponse) -> None:
    response.del_cookie(COOKIE, path="/_proxy")


_LOCAL = re.compile(r"/_proxy/[!-\[\]-~]*")  # printable ASCII, no space, no backslash: never another site or header


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a path of this proxy's pages only."""
    return target if target and _LOCAL.fullmatch(target) else HOME


def _without_token(request: web.Request) -> str:
    rest = [(k, v) for k, v in request.query.items() if k != "token"]
    return request.rel_url.raw_path + ("?" + urlencode(rest) if rest else "")  # still percent-encoded


def page(handler: Handler) -> Handler:
    """A dashboard page: the session (or Bearer); `?token=` logs in and comes back without it;
    anything else goes to the login form (303), audited."""

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        if "token" in request.query:
            clean = _without_token(request)
            if request.app[ADMIN].matches(request.query["token"]):
                response = see_other(clean)
                start_session(request, response)
                log.info("admin.login", client=request.remote, via="url")
                return response
            refused(request, "wrong token")
            return _to_login(clean)
        via = authorized(request)
        if via not in ("bearer", "session"):
            refused(request, via)
            return _to_login(request.rel_url.raw_path_qs if request.method == "GET" else HOME)
        return await handler(request)

    return guarded


def see_other(location: str) -> web.Response:
    """303 (a plain response: aiohttp wants HTTP exceptions raised, not returned); no Referer
    from it, so a `?token=` URL goes nowhere else."""
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store",
                                             "Referrer-Policy": "no-referrer"})


def _to_login(target: str) -> web.Response:
    return see_other(f"{LOGIN}?{urlencode({'next': target})}")


def api(handler: Handler | None = None, *, cookie: bool = True) -> Handler | Callable[[Handler], Handler]:
    """The JSON, CSV and admin API: Bearer (or, with `cookie`, the dashboard's session, so that its
    links to the JSON and CSV open in the browser); else 401 with a JSON body, audited."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def guarded(request: web.Request) -> web.StreamResponse:
            via = authorized(request, cookie=cookie)
            if via not in ("bearer", "session"):
                refused(request, via)
                return web.Response(
                    status=401, content_type="application/json",
                    headers={"WWW-Authenticate": 'Bearer realm="upscale-v2-proxy admin"', "Cache-Control": "no-store"},
                    body=orjson.dumps({"error": "unauthorized",
                                       "message": "this needs the admin token: Authorization: Bearer <token>"}))
            return await handler(request)

        return guarded

    return wrap(handler) if handler is not None else wrap


def csrf_ok(request: web.Request, sent: str | None) -> bool:
    return sent is not None and hmac.compare_digest(sent.encode("utf-8", "surrogateescape"),
                                                     request.app[ADMIN].csrf.encode())
