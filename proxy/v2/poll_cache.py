"""Direct-path polls with fewer V3 calls (DESIGN.md, "Polling economy").

Legacy SDKs poll each task every 0.5 to 1 s, V3 rate-limits its clients, and a terminal result
never changes. So, per task id and key fingerprint:

- concurrent polls share one upstream call; its error reaches every poll that shared it and is
  never kept, so the next poll asks again;
- a terminal result (V2 status final) is kept as long as its image URLs live: the shortest
  `image_url_ttl` of its images, from when it was fetched, or an hour when it has none;
- a non-terminal result answers polls for `fresh_for` seconds (0: not at all);
- with webhooks, `expect` makes polls hear "queued" until the webhook's result comes (`deliver`)
  or for the fallback's seconds, after which they ask V3.

The fingerprint is part of the key because V3 binds a task to the key that made it: a result
fetched with one key is never an answer for another, which goes upstream and hears V3 itself.

What is kept lives in this process. With Redis (replicas, or `--workers` on a shared Redis), a
`shared` tier is given too: every terminal result, fetched or delivered by a webhook, is also
written there, with the same TTL (what is left of it, for a reader), and a poll that finds
nothing here reads it before asking V3; a poll that finds only the local "queued" stand-in of
`expect` reads it too, since the webhook may have reached another replica. Running results and
the "queued" stand-in stay local. The shared tier never fails a poll: on a Redis error it answers
"nothing there" and the poll goes on to V3. Without Redis there is no shared tier: each process
sees only the webhooks that reach it (a webhook for another process's task is refused there, see
proxy/webhooks.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Literal

from proxy.errors import V2Status, is_final
from proxy.v3.models import TaskResult

if TYPE_CHECKING:
    from proxy.stores.redis import RedisSharedResults

Outcome = Literal["miss", "shared", "hit"]
Fetch = Callable[[], Awaitable[tuple[TaskResult, int]]]
Key = tuple[str, str]  # (task id, key fingerprint)
NO_IMAGES_TTL = 3600.0


@dataclass(slots=True)
class _Kept:
    result: TaskResult
    until: float  # clock reading
    waiting: bool = False  # expect()'s "queued" stand-in, until the webhook's result comes


class PollCache:
    def __init__(self, status_table: Mapping[str, int], *, fresh_for: float, max_entries: int,
                 shared: RedisSharedResults | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._status_table = status_table
        self._fresh_for = fresh_for
        self._max_entries = max_entries
        self._shared = shared
        self._clock = clock
        self._kept: OrderedDict[Key, _Kept] = OrderedDict()  # least recently used first
        self._flights: dict[Key, asyncio.Future[tuple[TaskResult, int | None, float]]] = {}

    def __len__(self) -> int:
        return len(self._kept)

    async def result(self, task_id: str, fingerprint: str, fetch: Fetch) -> tuple[TaskResult, int | None, Outcome]:
        """The task's result, the upstream HTTP status (None when this poll made no upstream call)
        and how the poll was answered (a result read from the shared tier is a "hit")."""
        if not self._max_entries:
            result, status = await fetch()
            return result, status, "miss"
        key = (task_id, fingerprint)
        kept = self._kept.get(key)
        if kept is not None:
            if self._clock() < kept.until:
                self._kept.move_to_end(key)
                if kept.waiting and self._shared is not None:  # the webhook may have reached another replica
                    found = await self._read_shared(key)
                    if found is not None:
                        self._keep(key, *found)
                        return found[0], None, "hit"
                return kept.result, None, "hit"
            del self._kept[key]
        flight = self._flights.get(key)
        if flight is not None:
            result, _, _ = await asyncio.shield(flight)
            return result, None, "shared"
        # The call runs as its own task, shielded: a first poller that goes away (its client hung
        # up) does not cancel the call the others are waiting for.
        flight = self._flights[key] = asyncio.ensure_future(self._fetch(key, fetch))
        flight.add_done_callback(partial(self._landed, key))
        result, status, _ = await asyncio.shield(flight)
        return result, status, "hit" if status is None else "miss"

    async def _fetch(self, key: Key, fetch: Fetch) -> tuple[TaskResult, int | None, float]:
        """From the shared tier, else from V3 (a terminal result is then written to the shared
        tier). -> (the result, V3's HTTP status or None, seconds it may answer polls)"""
        if self._shared is not None:
            found = await self._read_shared(key)
            if found is not None:
                return found[0], None, found[1]
        result, status = await fetch()
        ttl = self._ttl(result)
        if self._shared is not None and self._final(result):
            await self._write_shared(key, result, ttl)
        return result, status, ttl

    def _landed(self, key: Key, flight: asyncio.Future[tuple[TaskResult, int | None, float]]) -> None:
        del self._flights[key]
        if flight.cancelled() or flight.exception() is not None:  # exception(): also marks it read
            return
        result, _, ttl = flight.result()
        self._keep(key, result, ttl)

    async def deliver(self, task_id: str, fingerprint: str, result: TaskResult) -> None:
        """A result V3 sent to the proxy's webhook: kept like a fetched one, if it is final (in
        the shared tier too, for the other replicas' polls)."""
        if self._max_entries and self._final(result):
            key, ttl = (task_id, fingerprint), self._ttl(result)
            self._keep(key, result, ttl)
            if self._shared is not None:
                await self._write_shared(key, result, ttl)

    def expect(self, task_id: str, fingerprint: str, submitted_ms: int, seconds: float) -> None:
        """A task whose result V3 will send to the webhook: for `seconds`, polls hear that it is
        queued, without a V3 call; past that, they ask V3 (the webhook may never come). A final
        result already here (a webhook faster than the submission's reply) is left as it is."""
        if not self._max_entries:
            return
        key = (task_id, fingerprint)
        kept = self._kept.get(key)
        if kept is not None and self._clock() < kept.until and self._final(kept.result):
            return
        waiting = TaskResult.model_validate({
            "task": {"task_id": task_id, "status": "TASK_STATUS_QUEUED"},
            "extra": {"debug_info": {"submit_time_ms": submitted_ms}}})
        self._keep(key, waiting, seconds, waiting=True)

    def _keep(self, key: Key, result: TaskResult, ttl: float, waiting: bool = False) -> None:
        if ttl <= 0:
            return
        self._kept[key] = _Kept(result, self._clock() + ttl, waiting)
        self._kept.move_to_end(key)
        while len(self._kept) > self._max_entries:
            self._kept.popitem(last=False)

    def _final(self, result: TaskResult) -> bool:
        return is_final(self._status_table.get(result.task.status, V2Status.RUNNING))

    def _ttl(self, result: TaskResult) -> float:
        """Seconds a result may answer polls, from now."""
        if not self._final(result):
            return self._fresh_for
        return min((image.image_url_ttl for image in result.images or ()), default=NO_IMAGES_TTL)

    # --- the shared tier (Redis): terminal results only ------------------------------------------

    @staticmethod
    def _shared_key(key: Key) -> str:
        return f"poll:{key[0]}:{key[1]}"

    async def _read_shared(self, key: Key) -> tuple[TaskResult, float] | None:
        """A terminal result another replica (or this one) wrote, and the seconds it has left."""
        assert self._shared is not None
        found = await self._shared.get_with_ttl(self._shared_key(key))
        if found is None:
            return None
        try:
            result = TaskResult.model_validate_json(found[0])
        except ValueError:  # not one of ours (another release's format): as if absent
            return None
        if not self._final(result):
            return None
        return result, min(found[1], self._ttl(result))

    async def _write_shared(self, key: Key, result: TaskResult, ttl: float) -> None:
        assert self._shared is not None
        await self._shared.put(self._shared_key(key), result.model_dump_json().encode(), ttl)
