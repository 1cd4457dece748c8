"""V3's webhook, when the proxy is reachable from V3 (`UPSCALE_PROXY_WEBHOOKS`): V3 POSTs each
finished task to the URL given in `extra.webhook.url`, and polls are answered from it with no V3
call. Polling V3 stays the fallback: a webhook that never comes only makes the proxy ask later.

V3 does not sign its webhooks, so the URL of each submission carries a token that proves the call
and says whose task it is: the key fingerprint (never the key), the composed task if any, and an
expiry (unix seconds), followed by an HMAC-SHA256 over them, all base64url. A token is checked
with nothing stored: any process holding the same token secret accepts it, and a token that is
expired, malformed or forged (one character changed) is refused (404).

Which processes share the token secret follows where a delivered result can be seen:
- with Redis (`UPSCALE_PROXY_REDIS_URL`), deliveries are written to Redis, which every replica
  reads; the secret is derived from the fingerprint secret, the same on every replica, so any
  replica (any `--workers` process) accepts any token;
- without it, a delivery stays in the memory of the process it reached, so the secret is random
  per process: a webhook reaching another process (`serve --workers N`) gets 404, as before, and
  V3 retries it or the task falls back to polling V3.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
from aiohttp import web

from proxy.v3.models import TaskResult

EVENT = "ASYNC_TASK_RESULT"
ROUTE = "/_proxy/webhooks/v3/{token}"
MAX_EVENT_BYTES = 1 << 20  # a task result is a few kilobytes
TOKEN_CONTEXT = b"webhook-token"  # the token secret is HMAC(fingerprint secret, this): never the secret itself

_VERSION = 1
_HEAD = struct.Struct(">BIB")  # version, expiry (unix seconds), length of the fingerprint
_MAC_BYTES = hashlib.sha256().digest_size
_MAX_TOKEN_CHARS = 1024


@dataclass(frozen=True, slots=True)
class Owner:
    fingerprint: str
    composed_task: str | None  # None: a direct task, answered through the poll cache
    until: float  # unix time past which the token is refused


def token_secret(fingerprint_secret: bytes) -> bytes:
    """The key of the tokens' HMAC, derived from the fingerprint secret (one secret, two uses kept apart)."""
    return hmac.digest(fingerprint_secret, TOKEN_CONTEXT, "sha256")


class WebhookTokens:
    """Issues and checks self-verifying webhook tokens.

    `secret`: the fingerprint secret the token secret is derived from, or a function giving it (or
    None) when the tokens are first used: the app knows its secret only once it has started. None:
    a random token secret of this instance's own."""

    def __init__(self, public_url: str, ttl: float,
                 secret: bytes | Callable[[], bytes | None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._base = public_url.rstrip("/")
        self._ttl, self._clock = ttl, clock
        self._secret_source = secret
        self._key: bytes | None = None

    def _mac_key(self) -> bytes:
        if self._key is None:
            source = self._secret_source() if callable(self._secret_source) else self._secret_source
            self._key = token_secret(source) if source else secrets.token_bytes(32)
        return self._key

    def issue(self, fingerprint: str, composed_task: str | None = None) -> str:
        """A webhook URL for one submission of this caller's (and this composed task's)."""
        return self._base + ROUTE.format(token=self.token(fingerprint, composed_task))

    def token(self, fingerprint: str, composed_task: str | None = None) -> str:
        fp, task = fingerprint.encode(), (composed_task or "").encode()
        if len(fp) > 255:
            raise ValueError("a key fingerprint is at most 255 bytes")
        until = min(int(self._clock() + self._ttl) + 1, 0xFFFFFFFF)  # rounded up: never shorter than ttl
        body = _HEAD.pack(_VERSION, until, len(fp)) + fp + task
        mac = hmac.digest(self._mac_key(), body, "sha256")
        return base64.urlsafe_b64encode(body + mac).rstrip(b"=").decode("ascii")

    def owner(self, token: str) -> Owner | None:
        """Whose task the token was issued for; None if it is malformed, forged or expired."""
        if not token or len(token) > _MAX_TOKEN_CHARS or not token.isascii():
            return None
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            return None
        # one token, one spelling: characters outside the alphabet, or bits past the end, are refused
        if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != token:
            return None
        if len(raw) < _HEAD.size + _MAC_BYTES:
            return None
        body, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if not hmac.compare_digest(mac, hmac.digest(self._mac_key(), body, "sha256")):
            return None
        version, until, fp_len = _HEAD.unpack_from(body)
        if version != _VERSION or len(body) < _HEAD.size + fp_len or self._clock() > until:
            return None
        try:
            fingerprint = body[_HEAD.size:_HEAD.size + fp_len].decode()
            task = body[_HEAD.size + fp_len:].decode()
        except UnicodeDecodeError:
            return None
        return Owner(fingerprint, task or None, float(until))


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
    except ValueError as e:  # the model's own error (a ValidationError, or BadReply) is one
        raise ValueError("not a task result") from e


def handler(tokens: WebhookTokens, deliver: Callable[[Owner, TaskResult], Awaitable[None]]):
    """POST /_proxy/webhooks/v3/{token}: answered once the result is kept (V3 waits 5 s, then retries)."""

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
            await deliver(owner, result)
        return web.Response(status=204)

    return webhook
