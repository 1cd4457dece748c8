"""The typed V3 client: one pooled session, explicit timeouts, a retry policy, V3's own errors.

It raises only the errors drawn in `proxy.v3.errors`; aiohttp's exceptions become those in one
place (`_v3_error`), and V2 codes are none of its business (the V2 edge maps them).

Retries: a GET is retried after a connection error or a 5xx, with jittered exponential backoff.
A POST is retried only when the connection could not be opened at all: once its body may have
reached the upstream it is never sent again (a second upscale would be a second charge).

Every attempt goes through the client's circuit breaker (`proxy.v3.breaker`): after repeated
failures that say V3 is down, attempts fail fast with V3Unreachable, without touching the network,
until a probe call after the cool-down finds V3 back. A poll (`task_result(gated=False)`) always
tries, with its own shorter timeout, and tells the breaker how it went: it is how a client
waiting on a task hears V3 is back, and V3 answering it closes the breaker.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import quote

import aiohttp
from yarl import URL

from proxy.v3.breaker import DOWN_STATUSES, CircuitBreaker, Ticket
from proxy.v3.errors import V3BadReply, V3StatusError, V3Timeout, V3Unreachable
from proxy.v3.models import BadReply, SubmitReply, TaskResult
from proxy.v3.payload import UpscaleBody

M = TypeVar("M", SubmitReply, TaskResult)
RETRY_STATUSES = frozenset({500, 502, 503, 504})
MAX_BACKOFF = 2.0
_PLAIN_ID = re.compile(r"[A-Za-z0-9_.\-]+")  # a task id that needs no quoting in a query: V3's, V2's


@dataclass
class Reply:
    status: int
    body: bytes


def _v3_error(e: aiohttp.ClientError | TimeoutError) -> V3Unreachable | V3Timeout:
    """aiohttp's exceptions -> V3's. The messages name no address (aiohttp's do): the original
    stays the `__cause__`, for the log."""
    if isinstance(e, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
        return V3Unreachable("could not connect to V3", sent=False)
    if isinstance(e, TimeoutError):  # after the connect timeout above: the whole call took too long
        return V3Timeout("V3 did not answer in time")
    return V3Unreachable("the connection to V3 broke before its reply was read", sent=True)


class V3Client:
    def __init__(self, session: aiohttp.ClientSession, base_url: str, *, retries: int = 2,
                 backoff: float = 0.1, observe: Callable[[str, float], None] | None = None,
                 breaker: CircuitBreaker | None = None,
                 poll_timeout: aiohttp.ClientTimeout | None = None) -> None:
        self._session = session
        self._base = base_url.rstrip("/")
        self._submit_url = URL(f"{self._base}/v3/async/upscale")
        self._retries = retries
        self._backoff = backoff
        self._observe = observe or (lambda call, seconds: None)
        self.breaker = breaker or CircuitBreaker()  # one per upstream: this client's
        self._poll_timeout = poll_timeout  # a task-result call's (None: the session's)

    async def submit(self, body: UpscaleBody, key: str) -> tuple[str, int]:
        """POST /v3/async/upscale -> (V3 task id, HTTP status)."""
        started = time.perf_counter()
        try:
            reply = await self._call("POST", self._submit_url, key, data=body)
        finally:
            self._observe("submit", time.perf_counter() - started)
        return self._parse(reply, SubmitReply).task_id, reply.status

    async def task_result(self, task_id: str, key: str, *, gated: bool = True) -> tuple[TaskResult, int]:
        """GET /v3/async/task-result -> (the task result, HTTP status). `gated=False`: the call
        goes even while the breaker is open (a client's poll)."""
        quoted = task_id if _PLAIN_ID.fullmatch(task_id) else quote(task_id, safe="")
        url = URL(f"{self._base}/v3/async/task-result?task_id={quoted}", encoded=True)
        kwargs = {} if self._poll_timeout is None else {"timeout": self._poll_timeout}
        started = time.perf_counter()
        try:
            reply = await self._call("GET", url, key, gated=gated, **kwargs)
        finally:
            self._observe("result", time.perf_counter() - started)
        return self._parse(reply, TaskResult), reply.status

    @staticmethod
    def _parse(reply: Reply, model: type[M]) -> M:
        if reply.status != 200:
            raise V3StatusError.from_reply(reply.status, reply.body)
        try:
            return model.model_validate_json(reply.body)
        except BadReply as e:
            raise V3BadReply("V3 sent a reply that cannot be read") from e

    async def _call(self, method: str, url: URL, key: str, *, gated: bool = True, **kwargs) -> Reply:
        headers = {"Authorization": f"Bearer {key}"}
        for attempt in range(self._retries + 1):
            last = attempt == self._retries
            ticket = self.breaker.admit() if gated else None  # open: V3Unreachable now, and nothing is sent
            try:
                async with self._session.request(method, url, headers=headers, **kwargs) as resp:
                    reply = Reply(resp.status, await resp.read())
            except (aiohttp.ClientError, TimeoutError) as e:
                self._report(ticket, down=True)
                error = _v3_error(e)
                if isinstance(error, V3Timeout) or last or (error.sent and method != "GET"):
                    raise error from e  # a POST that may have arrived is not re-sent; a timeout is not retried
            except BaseException:  # cancelled, or a bug: it says nothing about V3
                if ticket is not None:
                    self.breaker.abandon(ticket)
                raise
            else:
                self._report(ticket, down=reply.status in DOWN_STATUSES)
                if method != "GET" or last or reply.status not in RETRY_STATUSES:
                    return reply
            await asyncio.sleep(random.uniform(0, min(self._backoff * 2**attempt, MAX_BACKOFF)))
        raise AssertionError("unreachable")  # the last attempt always returns or raises

    def _report(self, ticket: Ticket | None, *, down: bool) -> None:
        if ticket is None:
            self.breaker.observe(down=down)
        else:
            self.breaker.record(ticket, down=down)
