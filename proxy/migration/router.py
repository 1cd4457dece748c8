"""Which side serves each call, as the app sees it: the migration file's rules, the changes made at
run time and whether V2 is gone (both re-read from the store every second, so every replica and
worker follows a change within a second), and the side that took each task.

- A submission goes where its client's stage says (stages.side_of), unless the client may force a
  side (X-Upscale-Proxy-Route: legacy | v3; UPSCALE_PROXY_ALLOW_ROUTE_HEADER, or the client's
  rule) or V2 is gone (every submission is translated).
- A poll goes to the side that took its task (the store remembers it for UPSCALE_PROXY_ROUTE_TTL);
  a task it does not know goes where the client's submissions go now.
- A change (the admin API, the dashboard, a rollback) is stored, becomes an event in the store and
  in the log (`migration.stage_changed`, with who and why), and holds at once in this process.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

import structlog

from proxy.migration.stages import SIDES, Rule, Rules, Side, side_of
from proxy.migration.store import MigrationStore

log = structlog.get_logger("proxy")
ROUTE_HEADER = "X-Upscale-Proxy-Route"
SERVED_BY_HEADER = "X-Upscale-Proxy-Served-By"
SIDES_KEPT = 100_000  # task -> side, in this process (a side never changes)


class Router:
    def __init__(self, rules: Rules, store: MigrationStore, *, allow_route: bool, route_ttl: float,
                 clock: Callable[[], float] = time.time, draw: Callable[[], float] = random.random) -> None:
        self.rules, self.store = rules, store
        self._allow_route, self._route_ttl, self._clock, self._draw = allow_route, route_ttl, clock, draw
        self.changes: dict[str, Rule] = {}
        self.labels: Mapping[str, str] = {}  # fingerprint -> label, for the file's rules by label
        self.gone: str | None = None  # why V2 is taken to be gone
        self._sides: OrderedDict[str, Side] = OrderedDict()

    async def refresh(self, labels: Mapping[str, str]) -> None:
        """Re-read what other processes may have changed."""
        self.changes = await self.store.changes()
        self.gone = await self.store.v2_gone()
        self.labels = labels

    def rule(self, fingerprint: str | None) -> Rule:
        return self.rules.rule_for(fingerprint, self.labels.get(fingerprint or ""), self.changes)

    def submission(self, fingerprint: str | None, forced: str | None) -> tuple[Side, str]:
        """The side of a new submission, and why (for the audit): its stage, forced, or v2-gone."""
        return self._side(fingerprint, forced, self._draw())

    def _side(self, fingerprint: str | None, forced: str | None, draw: float) -> tuple[Side, str]:
        if self.gone is not None:
            return "v3", "v2-gone"
        rule = self.rule(fingerprint)
        if forced in SIDES and (self._allow_route or rule.allow_route):
            return forced, "forced"  # type: ignore[return-value]
        return side_of(rule, fingerprint, self.rules.canary_hash, draw), rule.stage

    async def poll(self, task_id: str, fingerprint: str | None, forced: str | None) -> Side:
        """The side of a poll: the side that took the task; for a task no side is known to have
        taken (remembered no longer), the client's side now, a per-call canary's choice drawn as 0."""
        side = self._sides.get(task_id)
        if side is None:
            side = await self.store.side_of_task(task_id)
            if side is None:
                return self._side(fingerprint, forced, 0.0)[0]
            self._keep(task_id, side)
        return side

    async def took(self, task_id: str, side: Side) -> None:
        """A side took a task: its polls go there, on every replica."""
        self._keep(task_id, side)
        await self.store.remember_task(task_id, side, self._route_ttl)

    def _keep(self, task_id: str, side: Side) -> None:
        self._sides[task_id] = side
        if len(self._sides) > SIDES_KEPT:
            self._sides.popitem(last=False)

    async def change(self, fingerprint: str, rule: Rule | None, *, by: str, why: str, source: str = "admin",
                     figures: dict | None = None) -> Rule:
        """Set (or, with None, clear) a client's rule at run time. -> the rule it is under now.
        `figures`: what made a rollback or promotion, kept with the event."""
        before = self.rule(fingerprint)
        if rule is not None:
            rule = Rule(rule.stage, rule.percent, rule.allow_route, source, why, by, self._clock(), rule.hold_until)
        await self.store.set_change(fingerprint, rule)
        if rule is None:
            self.changes.pop(fingerprint, None)
        else:
            self.changes[fingerprint] = rule
        after = self.rule(fingerprint)
        event = {"at": self._clock(), "fingerprint": fingerprint, "from": before.stage, "to": after.stage,
                 "percent": after.percent, "source": source, "by": by, "why": why, "figures": figures or {}}
        await self.store.add_event(event)
        log.warning("migration.stage_changed", **event)
        return after

    async def fall_forward(self, why: str) -> None:
        """V2 is gone: every client is translated from now on (said once, by the first to see it)."""
        self.gone = why
        if await self.store.set_v2_gone(why):
            event = {"at": self._clock(), "fingerprint": "*", "from": "*", "to": "translated", "percent": 0,
                     "source": "fall-forward", "by": "proxy", "why": why}
            await self.store.add_event(event)
            log.warning("migration.v2_gone", why=why, action="every client is translated from now on")

    async def v2_back(self, *, by: str, why: str) -> bool:
        """The operator says V2 answers again: clients go back to their stages (on every replica
        within a second). False if V2 was not taken to be gone."""
        self.gone = None
        if not await self.store.clear_v2_gone():
            return False
        event = {"at": self._clock(), "fingerprint": "*", "from": "translated", "to": "*", "percent": 0,
                 "source": "admin", "by": by, "why": why, "figures": {}}
        await self.store.add_event(event)
        log.warning("migration.v2_back", by=by, why=why)
        return True
