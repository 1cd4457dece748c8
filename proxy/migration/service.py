"""The migration as the app runs it: what follows a call, a shadow comparison, and the steps back
or forward they lead to.

- A shadow comparison is counted in the usage store (per client, and per feature that explained
  it), kept in the migration store with its figures, and, unless it matched, its three images (V2's,
  the translation's, the heat map of their difference) kept in the blob store for IMAGES_TTL, for
  the dashboard's side-by-side view.
- A call the translation served, and each comparison, go to the health judge (health.py); a step
  it asks for becomes a stage change with its figures, by "proxy", held back after a rollback for
  UPSCALE_PROXY_ROLLBACK_HOLD.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable

import structlog

from proxy.migration.health import FAILURE_CODES, Health, Step
from proxy.migration.router import Router
from proxy.migration.shadow import ShadowResult, Shadows
from proxy.migration.stages import Rule, step_back, step_forward
from proxy.migration.store import MigrationStore
from proxy.stores import ResultStore
from proxy.usage.tally import Tallies

log = structlog.get_logger("proxy")
IMAGES_TTL = 7 * 86400
JUDGED_KEPT = 100_000  # tasks whose final status was judged (a task is polled many times)


class Migration:
    def __init__(self, router: Router, store: MigrationStore, health: Health, blobs: ResultStore, tallies: Tallies,
                 *, hold: float, promote_percent: int, clock: Callable[[], float] = time.time) -> None:
        self.router, self.store, self.health = router, store, health
        self._blobs, self._tallies, self._hold, self._promote_percent = blobs, tallies, hold, promote_percent
        self._clock = clock
        self.shadows: Shadows | None = None  # set once the app has its sides (app.py)
        self._judged: OrderedDict[str, None] = OrderedDict()
        self._steps: set[asyncio.Task] = set()

    async def on_shadow(self, result: ShadowResult) -> None:
        """A shadow comparison's result: counted, kept, judged."""
        fp = result.fingerprint
        c = result.comparison
        self._tallies.shadow(fp, result.outcome, c.explained_by if c else ())
        doc = {"id": uuid.uuid4().hex, "at": self._clock(), "fingerprint": fp, "legacy_task_id": result.legacy_task_id,
               "v3_task_id": result.v3_task_id, **(c.to_doc() if c else {"outcome": "error", "why": result.error}),
               "noise": result.noise.to_doc() if result.noise else None, "images": result.images is not None}
        if result.images is not None:
            for name, png in zip(("v2", "v3", "heat"), result.images, strict=True):
                if png is not None:
                    await self._blobs.put(f"shadow-{doc['id']}-{name}.png", png, ttl=IMAGES_TTL)
        await self.store.add_comparison(doc)
        if fp is not None:
            await self._apply(fp, self.health.comparison(fp, self.router.rule(fp).stage, result.outcome))

    def after_call(self, fingerprint: str | None, served_by: str | None, code: int, task_id: str | None,
                   status: int | None) -> None:
        """A V2 call answered (the edge, for every call): a translated one of a client in canary or
        translated goes to the judge, once per task: a submission the translation failed, or the
        final status of a task (its first final poll)."""
        if fingerprint is None or served_by == "legacy":
            return
        if status is None:  # a submission, or a poll answered with an error code
            if code not in FAILURE_CODES:
                return
        else:
            if status < 2 or task_id is None or task_id in self._judged:
                return
            self._judged[task_id] = None
            if len(self._judged) > JUDGED_KEPT:
                self._judged.popitem(last=False)
        step = self.health.call(fingerprint, self.router.rule(fingerprint).stage, code=code, status=status)
        if step is not None:  # rare: a stage change, off the call's path
            task = asyncio.get_running_loop().create_task(self._apply(fingerprint, step))
            self._steps.add(task)
            task.add_done_callback(self._steps.discard)

    async def _apply(self, fingerprint: str, step: Step | None) -> None:
        if step is None:
            return
        rule, now = self.router.rule(fingerprint), self._clock()
        if step.direction == "back":  # a canary it steps back to takes the configured share, not 100 %
            back = step_back(rule.stage)
            target = Rule(back, self._promote_percent if back == "canary" else 0, rule.allow_route,
                          hold_until=now + self._hold)
            source = "rollback"
        elif now < rule.hold_until:
            return
        else:
            target = Rule(step_forward(rule.stage), self._promote_percent, rule.allow_route)
            source = "promotion"
        if target.stage == rule.stage:
            return
        why = f"{step.why}: " + ", ".join(f"{k} {v}" for k, v in step.figures.items())
        await self.router.change(fingerprint, target, by="proxy", why=why, source=source, figures=step.figures)
        self.health.forget(fingerprint)

    async def close(self) -> None:
        if self.shadows is not None:
            await self.shadows.close()
        for task in list(self._steps):
            task.cancel()
