"""The usage store as the app holds it: the tallies the hot path adds to, the store they are
flushed to every second, and the context every view reads (the clock, the rules, the names).

A flush that fails is logged (once per outage, then at debug level) and its counts are given
back, to go out with the next one: a store outage delays the dashboard, never fails a call and
loses nothing while this process lives.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from proxy.settings import Settings
from proxy.usage.stores import UsageStore
from proxy.usage.tally import Tallies
from proxy.usage.view import Context

log = structlog.get_logger("proxy")
DAY = 86400
USAGE_FLUSH_EVERY = 1.0  # seconds


def context_of(settings: Settings, now: float) -> Context:
    """What the views need of the settings: the readiness window, the sunset, the operator's labels
    and the brownout windows."""
    return Context(now, settings.migrated_after_days, settings.sunset_date, settings.client_labels,
                   tuple((b.start, b.end, b.fraction) for b in settings.brownouts))


class Usage:
    def __init__(self, store: UsageStore, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.tallies = Tallies(clock)
        self.retention = settings.usage_retention_days * DAY
        self._settings = settings
        self._clock = clock
        self.last_flush = clock()  # the last time the store took everything counted (the lag's start)
        self.flush_errors = 0
        self._failing = False

    def context(self) -> Context:
        return context_of(self._settings, self._clock())

    def lag(self) -> float:
        """Seconds since the store last took everything counted: about a second when healthy."""
        return self._clock() - self.last_flush if len(self.tallies) else 0.0

    async def flush(self) -> None:
        batch = self.tallies.take()
        if not batch:
            self.last_flush = self._clock()
            return
        try:
            await self.store.add(batch, self.retention)
        except Exception as e:  # the store is away: keep the counts for the next flush
            self.tallies.put_back(batch)
            self.flush_errors += 1
            (log.debug if self._failing else log.warning)("usage store flush failed; its counts are kept",
                                                          error=f"{type(e).__name__}: {e}")
            self._failing = True
            return
        if self._failing:
            log.info("usage store flush works again")
        self._failing = False
        self.last_flush = self._clock()

    async def prune(self) -> int:
        return await self.store.prune(int(self._clock() - self.retention))
