"""The direct path: one V3 job whose result is the answer, so the V2 task id is the V3 task id.

Nothing is stored; polls go through the poll cache (one V3 call for concurrent polls, terminal
results kept), and with webhooks on, V3 tells the proxy the result and polls make no V3 call.
With Redis, the poll cache shares terminal and delivered results between replicas, so the
webhook may reach any of them (proxy/v2/poll_cache.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from proxy.translate.steps import V3Job
from proxy.v2.poll_cache import Outcome, PollCache
from proxy.v3.client import V3Client
from proxy.v3.models import TaskResult
from proxy.v3.payload import UpscaleBody
from proxy.webhooks import WebhookTokens


class DirectTasks:
    def __init__(self, v3: V3Client, cache: PollCache, webhooks: WebhookTokens | None = None,
                 webhook_fallback: float = 30.0, clock: Callable[[], float] = time.time) -> None:
        self._v3, self._cache, self._webhooks = v3, cache, webhooks
        self._fallback, self._clock = webhook_fallback, clock

    async def submit(self, job: V3Job, image_b64: memoryview | bytes, key: str, fingerprint: str) -> tuple[str, int]:
        """POST the one V3 job. -> (the task id, V3's HTTP status)"""
        webhook = self._webhooks.issue(fingerprint) if self._webhooks else None
        task_id, status = await self._v3.submit(
            UpscaleBody(job.model, job.scale_factor, image_b64, webhook_url=webhook), key)
        if webhook:
            self._cache.expect(task_id, fingerprint, int(self._clock() * 1000), self._fallback)
        return task_id, status

    async def result(self, task_id: str, key: str, fingerprint: str) -> tuple[TaskResult, int | None, Outcome]:
        """The task's V3 result: kept, shared with concurrent polls, or fetched. -> (the result,
        V3's HTTP status or None when this poll made no call, how it was answered)"""
        return await self._cache.result(task_id, fingerprint, lambda: self._v3.task_result(task_id, key, gated=False))

    async def deliver(self, fingerprint: str, result: TaskResult) -> None:
        """A result V3 sent to the webhook."""
        await self._cache.deliver(result.task.task_id, fingerprint, result)
