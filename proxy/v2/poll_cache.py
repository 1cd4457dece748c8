"""Direct-path polls with fewer V3 calls (DESIGN.md, "Polling economy").

Legacy SDKs poll each task every 0.5 to 1 s, V3 rate-limits its clients, and a terminal result
never changes. So, per task id and key fingerprint:

- concurrent polls share one upstream call; its error reaches every poll that shared it and is
  never kept, so the next poll asks again;
- a terminal result (V2 status final) is kept as long as its image URLs live: the shortest
  `image_url_ttl` of its images, from when it was fetched, or an hour when it has none;
- a non-terminal result answers polls for `fresh_for` seconds (0: not at all).

The fingerprint is part of the key because V3 binds a task to the key that made it: a result
fetched with one key is never an answer for another, which goes upstream and hears V3 itself.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Literal

from proxy.errors import V2Status
from proxy.v3.models import TaskResult

Outcome = Literal["miss", "shared", "hit"]
Fetch = Callable[[], Awaitable[tuple[TaskResult, int]]]
Key = tuple[str, str]  # (task id, key fingerprint)
NO_IMAGES_TTL = 3600.0


@dataclass(slots=True)
class _Kept:
    result: TaskResult
    until: float  # clock reading


class PollCache:
    def __init__(self, status_table: Mapping[str, int], *, fresh_for: float, max_entries: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._status_table = status_table
        self._fresh_for = fresh_for
        self._max_entries = max_entries
        self._clock = clock
        self._kept: OrderedDict[Key, _Kept] = OrderedDict()  # least recently used first
        self._flights: dict[Key, asyncio.Future[tuple[TaskResult, int]]] = {}

    def __len__(self) -> int:
        return len(self._kept)

    async def result(self, task_id: str, fingerprint: str, fetch: Fetch) -> tuple[TaskResult, int | None, Outcome]:
        """The task's result, the upstream HTTP status (None when this poll made no upstream call)
        and how the poll was answered."""
        if not self._max_entries:
            result, status = await fetch()
            return result, status, "miss"
        key = (task_id, fingerprint)
        kept = self._kept.get(key)
        if kept is not None:
            if self._clock() < kept.until:
                self._kept.move_to_end(key)
                return kept.result, None, "hit"
            del self._kept[key]
        flight = self._flights.get(key)
        if flight is not None:
            result, _ = await asyncio.shield(flight)
            return result, None, "shared"
        # The call runs as its own task, shielded: a first poller that goes away (its client hung
        # up) does not cancel the call the others are waiting for.
        flight = self._flights[key] = asyncio.ensure_future(fetch())
        flight.add_done_callback(partial(self._landed, key))
        result, status = await asyncio.shield(flight)
        return result, status, "miss"

    def _landed(self, key: Key, flight: asyncio.Future[tuple[TaskResult, int]]) -> None:
        del self._flights[key]
        if flight.cancelled() or flight.exception() is not None:  # exception(): also marks it read
            return
        self._keep(key, flight.result()[0], self._ttl(flight.result()[0]))

    def deliver(self, task_id: str, fingerprint: str, result: TaskResult) -> None:
        """A result V3 sent to the proxy's webhook: kept like a fetched one, if it is final."""
        if self._max_entries and V2Status(self._status_table.get(result.task.status, V2Status.RUNNING)).final:
            self._keep((task_id, fingerprint), result, self._ttl(result))

    def expect(self, task_id: str, fingerprint: str, submitted_ms: int, seconds: float) -> None:
        """A task whose result V3 will send to the webhook: for `seconds`, polls hear that it is
        queued, without a V3 call; past that, they ask V3 (the webhook may never come)."""
        if self._max_entries:
            waiting = TaskResult.model_validate({
                "task": {"task_id": task_id, "status": "TASK_STATUS_QUEUED"},
                "extra": {"debug_info": {"submit_time_ms": submitted_ms}}})
            self._keep((task_id, fingerprint), waiting, seconds)

    def _keep(self, key: Key, result: TaskResult, ttl: float) -> None:
        if ttl <= 0:
            return
        self._kept[key] = _Kept(result, self._clock() + ttl)
        self._kept.move_to_end(key)
        while len(self._kept) > self._max_entries:
            self._kept.popitem(last=False)

    def _ttl(self, result: TaskResult) -> float:
        """Seconds a result may answer polls, from now."""
        if not V2Status(self._status_table.get(result.task.status, V2Status.RUNNING)).final:
            return self._fresh_for
        return min((image.image_url_ttl for image in result.images or ()), default=NO_IMAGES_TTL)
