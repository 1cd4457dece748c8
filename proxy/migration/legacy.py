"""The legacy side: a V2 call forwarded to the real V2 (UPSCALE_PROXY_V2_UPSTREAM) as the client
sent it (method, path, query, key, body, headers), and V2's reply passed back as it came.

Two answers are the migration's to act on, not the client's: V2 answering 404 or 410 without a V2
body (it has been removed), and V2 unreachable for longer than UPSCALE_PROXY_V2_GONE_AFTER; both
raise LegacyGone, and the router moves every client to the translation ("falling forward"). A
shorter outage, or any other reply that is not a V2 body (a gateway's error page), raises
LegacyUnavailable: a submission gets code 5 (as V2 being down gave), a poll its task's last known
state (proxy/v2/last_known.py). So a V2 client is never handed anything but a V2 body.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.headers import end_to_end

GONE_STATUSES = frozenset({404, 410})
# not passed on either way: aiohttp sets the length and encoding of what it sends and reads
_OWN = frozenset({"content-length", "content-encoding", "accept-encoding"})


class LegacyUnavailable(Exception):
    """V2 could not be reached this time."""


class LegacyGone(Exception):
    """V2 has been removed, or has been unreachable past the setting: the reason says which."""


def v2_envelope(body: bytes) -> dict | None:
    """The V2 envelope `{code, msg, data}` a body is, or None (a gateway's page, V3's error shape)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(doc, dict) and {"code", "msg", "data"} <= doc.keys() and isinstance(doc["code"], int):
        return doc
    return None


@dataclass(frozen=True, slots=True)
class LegacyReply:
    """V2's reply, as it came, and its envelope (a reply that is none is never handed on)."""

    status: int
    headers: CIMultiDict
    body: bytes
    doc: dict

    @property
    def code(self) -> int:
        return self.doc["code"]

    @property
    def data(self) -> dict | None:
        return self.doc["data"] if isinstance(self.doc["data"], dict) else None

    def response(self) -> web.Response:
        return web.Response(status=self.status, headers=self.headers, body=self.body)


class LegacyV2:
    def __init__(self, session: aiohttp.ClientSession, base_url: str, *, gone_after: float,
                 timeout: aiohttp.ClientTimeout | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._session, self._base = session, base_url.rstrip("/")
        self._gone_after, self._timeout, self._clock = gone_after, timeout, clock
        self._down_since: float | None = None  # the first failure of the current outage

    async def call(self, request: web.Request, body: bytes | None) -> LegacyReply:
        """Forward the client's call to V2. Raises LegacyGone or LegacyUnavailable."""
        headers = CIMultiDict((k, v) for k, v in end_to_end(request.headers).items() if k.lower() not in _OWN)
        return await self.send(request.method, request.rel_url.raw_path_qs, headers, body)

    async def send(self, method: str, path_qs: str, headers: CIMultiDict | dict, body: bytes | None) -> LegacyReply:
        """A call of the proxy's own to V2 (a shadow's polls): as `call`."""
        url = URL(self._base + path_qs, encoded=True)
        path = url.path
        try:
            async with self._session.request(method, url, headers=headers, data=body,
                                             allow_redirects=False, timeout=self._timeout,
                                             skip_auto_headers=("User-Agent",)) as resp:
                status, body = resp.status, await resp.read()
                replied = CIMultiDict((k, v) for k, v in end_to_end(resp.headers).items() if k.lower() not in _OWN)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise self._down("V2 could not be reached") from e
        doc = v2_envelope(body)
        if doc is None:  # not V2 speaking: removed, or something in front of it failing
            if status in GONE_STATUSES:
                raise LegacyGone(f"V2 answered HTTP {status} to {path}")
            raise self._down(f"V2 answered HTTP {status} without a V2 body")
        self._down_since = None
        return LegacyReply(status, replied, body, doc)

    def _down(self, why: str) -> LegacyUnavailable | LegacyGone:
        """A failed call: unavailable, or gone once the outage has lasted past the setting."""
        now = self._clock()
        self._down_since = self._down_since or now
        if now - self._down_since > self._gone_after:
            return LegacyGone(f"V2 unreachable for {now - self._down_since:.0f} s ({why})")
        return LegacyUnavailable(why)
