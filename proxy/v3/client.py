"""The typed V3 client: one pooled session, explicit timeouts, a retry policy, V3 errors as V2Error.

Retries: a GET is retried after a connection error or a 5xx, with jittered exponential backoff.
A POST is retried only when the connection could not be opened at all: once its body may have
reached the upstream it is never sent again (a second upscale would be a second charge).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import quote

import aiohttp
from pydantic import BaseModel, ValidationError
from yarl import URL

from proxy.errors import V2Code, V2Error
from proxy.mappings import ErrorTable
from proxy.translate.errors import from_v3_error
from proxy.v3.models import SubmitReply, TaskResult
from proxy.v3.payload import UpscaleBody

M = TypeVar("M", bound=BaseModel)
RETRY_STATUSES = frozenset({500, 502, 503, 504})
MAX_BACKOFF = 2.0


@dataclass
class Reply:
    status: int
    body: bytes


class V3Client:
    def __init__(self, session: aiohttp.ClientSession, base_url: str, errors: ErrorTable, *,
                 retries: int = 2, backoff: float = 0.1,
                 observe: Callable[[str, float], None] | None = None) -> None:
        self._session = session
        self._base = base_url.rstrip("/")
        self._submit_url = URL(f"{self._base}/v3/async/upscale")
        self._errors = errors
        self._retries = retries
        self._backoff = backoff
        self._observe = observe or (lambda call, seconds: None)

    async def submit(self, body: UpscaleBody, key: str) -> tuple[str, int]:
        """POST /v3/async/upscale -> (V3 task id, HTTP status)."""
        started = time.perf_counter()
        try:
            reply = await self._call("POST", self._submit_url, key, data=body)
        finally:
            self._observe("submit", time.perf_counter() - started)
        return self._parse(reply, SubmitReply).task_id, reply.status

    async def task_result(self, task_id: str, key: str) -> tuple[TaskResult, int]:
        """GET /v3/async/task-result -> (the task result, HTTP status)."""
        url = URL(f"{self._base}/v3/async/task-result?task_id={quote(task_id, safe='')}", encoded=True)
        started = time.perf_counter()
        try:
            reply = await self._call("GET", url, key)
        finally:
            self._observe("result", time.perf_counter() - started)
        return self._parse(reply, TaskResult), reply.status

    def _parse(self, reply: Reply, model: type[M]) -> M:
        if reply.status != 200:
            raise from_v3_error(reply.status, reply.body, self._errors)
        try:
            return model.model_validate_json(reply.body)
        except ValidationError as e:
            raise V2Error(V2Code.INTERNAL_ERROR, "upstream sent a reply the proxy cannot read",
                          upstream_status=reply.status) from e

    async def _call(self, method: str, url: URL, key: str, **kwargs) -> Reply:
        headers = {"Authorization": f"Bearer {key}"}
        for attempt in range(self._retries + 1):
            last = attempt == self._retries
            try:
                async with self._session.request(method, url, headers=headers, **kwargs) as resp:
                    body = await resp.read()
                    if method != "GET" or last or resp.status not in RETRY_STATUSES:
                        return Reply(resp.status, body)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
                if last:  # nothing was sent: safe to retry any method
                    raise V2Error(V2Code.HOST_UNAVAILABLE, f"upstream unreachable: {e}") from e
            except TimeoutError as e:
                raise V2Error(V2Code.TIMEOUT, "upstream did not answer in time") from e
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
                if method != "GET" or last:
                    raise V2Error(V2Code.HOST_UNAVAILABLE, f"upstream connection failed: {e!r}") from e
            await asyncio.sleep(random.uniform(0, min(self._backoff * 2**attempt, MAX_BACKOFF)))
        raise AssertionError("unreachable")  # the last attempt always returns or raises
