"""What a poll answers when it can't learn its task's state (DESIGN.md, "Polls are the most
forgiving hop").

A legacy SDK's wait loop dies on the first poll that is not code 0: `data: null` has no `status`,
and the JS SDK rejects any other code outright. So when V3 (or, for a composed task, the task
store) can't be reached for a poll, the poll is answered with code 0 and, per task and key
fingerprint:

- the progress data its last answered poll had (status, progress, eta as they were then); a final
  one never changes, so it stands through any outage;
- for a task this process never answered (submitted through another replica, or before a
  restart): status 1, no progress yet;
- once the task has been unreachable for longer than the grace (UPSCALE_PROXY_POLL_OUTAGE_GRACE),
  counted from its first poll that failed in a row of them, a final answer: status 3, with a
  `failed_reason` saying the upstream could not be reached, so no client waits forever.

A poll that is answered again clears its task's outage. What is kept is the data dict each poll
was answered with (a reference, not a copy), in this process, the least recently polled dropped
first past `max_entries`: a task dropped from here is answered as one never seen.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from proxy.errors import V2Status, is_final
from proxy.translate.progress import failed_progress, v2_progress

StandIn = Literal["last_known", "unseen", "past_grace"]
MAX_ENTRIES = 50_000
UNSEEN_ETA = 5  # seconds: a first guess, as for any task V3 has not given an eta for


@dataclass(slots=True)
class _Known:
    data: dict | None  # the last progress data answered; None: none was, here
    outage_since: float | None = None  # clock reading of the first poll that failed, in a row of them


class LastKnown:
    def __init__(self, grace: float, max_entries: int = MAX_ENTRIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._grace, self._max_entries, self._clock = grace, max_entries, clock
        self._known: OrderedDict[tuple[str, str | None], _Known] = OrderedDict()

    def __len__(self) -> int:
        return len(self._known)

    def answered(self, task_id: str, fingerprint: str | None, data: dict) -> None:
        """A poll was answered with `data` (its outage, if any, is over)."""
        self._keep((task_id, fingerprint), _Known(data))

    def stand_in(self, task_id: str, fingerprint: str | None, why: str) -> tuple[dict, StandIn]:
        """The data to answer a poll that could not reach what knows the task's state, and which
        kind of answer it is; `why` says what could not be reached, for a final failure."""
        key = (task_id, fingerprint)
        known = self._known.get(key)
        if known is None:
            known = self._keep(key, _Known(None))
        if known.data is not None and is_final(known.data["status"]):
            return known.data, "last_known"
        now = self._clock()
        if known.outage_since is None:
            known.outage_since = now
        unreachable_for = now - known.outage_since
        if unreachable_for > self._grace:
            return self._given_up(known.data, unreachable_for, why), "past_grace"
        if known.data is None:
            return _unseen(), "unseen"
        return known.data, "last_known"

    def _keep(self, key: tuple[str, str | None], known: _Known) -> _Known:
        self._known[key] = known
        self._known.move_to_end(key)
        if len(self._known) > self._max_entries:
            self._known.popitem(last=False)
        return known

    @staticmethod
    def _given_up(data: dict | None, unreachable_for: float, why: str) -> dict:
        debug = data["debug_info"] if data else {}
        return failed_progress(
            f"the upstream could not be reached for {unreachable_for:.0f} s ({why}); the task's outcome "
            "is unknown: submit it again",
            submit_ms=debug.get("submit_time_ms", 0), execution_ms=debug.get("execution_time_ms", 0),
            finish_ms=int(time.time() * 1000))


def _unseen() -> dict:
    return v2_progress(status=int(V2Status.RUNNING), progress=0, eta=UNSEEN_ETA, imgs=None, failed_reason="",
                       submit_ms=0, execution_ms=0, finish_ms=0)
