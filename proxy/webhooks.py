"""V3's webhook, when the proxy is reachable from V3 (`UPSCALE_PROXY_WEBHOOKS`): V3 POSTs each
finished task to the URL given in `extra.webhook.url`, and polls are answered from it with no V3
call. Polling V3 stays the fallback: a webhook that never comes only makes the proxy ask later.

V3 does not sign its webhooks, so each submission gets its own unguessable token in the URL, and
the token says whose task it is (the key fingerprint, and the composed task, if any). A request
with an unknown token is refused. The tokens live in this process's memory.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from aiohttp import web
from pydantic import ValidationError

from proxy.v3.models import TaskResult

EVENT = "ASYNC_TASK_RESULT"
ROUTE = "/_proxy/webhooks/v3/{token}"
MAX_EVENT_BYTES = 1 << 20  # a task result is a few kilobytes


@dataclass(frozen=True, slots=True)
class Owner:
    fingerprint: str
    composed_task: str | None  # None: a direct task, answered through the poll cache
    until: float  # clock reading past which the token is forgotten


class WebhookTokens:
    def __init__(self, public_url: str, ttl: float, max_tokens: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._base = public_url.rstrip("/")
        self._ttl, self._max, self._clock = ttl, max_tokens, clock
        self._owners: OrderedDict[str, Owner] = OrderedDict()  # oldest first

    def issue(self, fingerprint: str, composed_task: str | None = None) -> str:
        """A fresh webhook URL for one submission of this caller's (and this composed task's)."""
        token = secrets.token_urlsafe(24)
        self._owners[token] = Owner(fingerprint, composed_task, self._clock() + self._ttl)
        while len(self._owners) > self._max:
            self._owners.popitem(last=False)
        return self._base + ROUTE.format(token=token)

    def owner(self, token: str) -> Owner | None:
        owner = self._owners.get(token)
        if owner is not None and self._clock() > owner.until:
            del self._owners[token]
            return None
        return owner


def read_event(body: bytes) -> TaskResult | None:
    """The task result of an ASYNC_TASK_RESULT event; None for any other event. ValueError: not one."""
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ValueError("not JSON") from e
    if not isinstance(event, dict) or event.get("event_type") != EVENT:
        return None
    try:
        return TaskResult.model_validate(event.get("payload"))
    except ValidationError as e:
        raise ValueError("not a task result") from e


def handler(tokens: WebhookTokens, deliver: Callable[[Owner, TaskResult], None]):
    """POST /_proxy/webhooks/v3/{token}: answered at once (V3 waits 5 s, then retries)."""

    async def webhook(request: web.Request) -> web.Response:
        owner = tokens.owner(request.match_info["token"])
        if owner is None:
            raise web.HTTPNotFound()
        if (request.content_length or 0) > MAX_EVENT_BYTES:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_EVENT_BYTES, actual_size=request.content_length)
        body = await request.content.read(MAX_EVENT_BYTES + 1)
        if len(body) > MAX_EVENT_BYTES:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_EVENT_BYTES, actual_size=len(body))
        try:
            result = read_event(body)
        except ValueError as e:
            raise web.HTTPBadRequest(text=f"not a V3 webhook event: {e}") from None
        if result is not None:
            deliver(owner, result)
        return web.Response(status=204)

    return webhook
