"""Shadow comparisons: a body V2 served goes through the translation too, in the background, and
when both sides have finished, their outcomes and images are compared (proxy/migration/compare.py).

Nothing here is on the client's path: `start` returns at once, and a comparison that fails (V2 or
V3 unreachable, an image that can't be fetched) is logged and counted as an error, never shown to
the client. The translation's V3 jobs are the client's (its key, as any call of it), and V3 calls
are paid: a budget bounds them, per process, `max_per_minute` shadows and a `fraction` of the
calls that may be shadowed.

Every `noise_every`-th shadow also sends the body to V2 a second time and compares V2 with itself:
the noise floor, which says how far apart two images of the same V2 can be (a model that is not
deterministic, an encoder that is not), so that a threshold is read against it.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from proxy.migration.compare import (
    Comparison,
    Thresholds,
    compare_images,
    compare_outcomes,
)

log = structlog.get_logger("proxy")
FINAL = (2, 3, 4)


class Refused(Exception):
    """The translation refused a body V2 served; `feature` is the unit a strict policy refused."""

    def __init__(self, msg: str, feature: str | None) -> None:
        super().__init__(msg)
        self.feature = feature


class Sides(Protocol):
    """What a shadow needs of the two sides, with the client's key (never stored)."""

    async def submit_translation(self, body: bytes, key: str, fingerprint: str | None) -> tuple[str, tuple[str, ...]]:
        """-> (the translation's task id, the feature units it approximates or skips); Refused."""

    async def translation_progress(self, task_id: str, key: str, fingerprint: str | None) -> dict: ...

    async def translation_image(self, task_id: str, data: dict, fingerprint: str | None) -> bytes: ...

    async def legacy_submit(self, body: bytes, key: str) -> str: ...

    async def legacy_progress(self, task_id: str, key: str) -> dict: ...

    async def legacy_image(self, url: str) -> bytes: ...


@dataclass(frozen=True)
class ShadowSettings:
    max_per_minute: int = 10
    fraction: float = 1.0
    noise_every: int = 20  # 0: never
    poll_every: float = 1.0
    deadline: float = 600.0  # seconds both sides have to finish
    thresholds: Thresholds = field(default_factory=Thresholds)


@dataclass(frozen=True)
class ShadowResult:
    fingerprint: str | None
    legacy_task_id: str
    v3_task_id: str | None
    comparison: Comparison | None  # None: the comparison could not be made (`error` says why)
    error: str = ""
    noise: Comparison | None = None  # V2 against itself, when this shadow measured the noise floor
    images: tuple[bytes, bytes, bytes | None] | None = None  # V2's, the translation's, the heat map

    @property
    def outcome(self) -> str:
        return self.comparison.outcome if self.comparison else "error"


class Shadows:
    def __init__(self, sides: Sides, settings: ShadowSettings, on_result: Callable[[ShadowResult], Awaitable[None]],
                 executor: Executor | None = None, clock: Callable[[], float] = time.monotonic,
                 draw: Callable[[], float] = random.random) -> None:
        self._sides, self._settings, self._on_result = sides, settings, on_result
        self._executor, self._clock, self._draw = executor, clock, draw
        self._started: collections.deque[float] = collections.deque()  # starts in the last minute
        self._count = 0
        self._running: set[asyncio.Task] = set()
        self.skipped = 0  # calls the budget left unshadowed

    def start(self, body: bytes, key: str, fingerprint: str | None, legacy_task_id: str) -> bool:
        """Shadow a call V2 took, if the budget allows. -> whether it is shadowed."""
        now, s = self._clock(), self._settings
        while self._started and self._started[0] <= now - 60:
            self._started.popleft()
        if len(self._started) >= s.max_per_minute or self._draw() >= s.fraction:
            self.skipped += 1
            return False
        self._started.append(now)
        self._count += 1
        noise = bool(s.noise_every) and self._count % s.noise_every == 1 % s.noise_every
        task = asyncio.create_task(self._run(body, key, fingerprint, legacy_task_id, noise))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return True

    async def close(self) -> None:
        for task in list(self._running):
            task.cancel()
        if self._running:
            await asyncio.wait(list(self._running))

    async def _run(self, body: bytes, key: str, fingerprint: str | None, legacy_id: str, noise: bool) -> None:
        try:
            result = await self._compare(body, key, fingerprint, legacy_id, noise)
        except Exception as e:  # a side failed us: no verdict on the translation
            log.warning("shadow comparison failed", fingerprint=fingerprint, task_id=legacy_id,
                        error=f"{type(e).__name__}: {e}")
            result = ShadowResult(fingerprint, legacy_id, None, None, error=f"{type(e).__name__}: {e}")
        await self._on_result(result)

    async def _compare(self, body: bytes, key: str, fingerprint: str | None, legacy_id: str,
                       noise: bool) -> ShadowResult:
        sides, s = self._sides, self._settings
        try:
            v3_id, approximated = await sides.submit_translation(body, key, fingerprint)
        except Refused as e:
            why = f"the translation refused what V2 served: {e}"
            comparison = Comparison("explained", why, explained_by=(e.feature,)) if e.feature else \
                Comparison("mismatch", why)
            return ShadowResult(fingerprint, legacy_id, None, comparison)
        twin = await sides.legacy_submit(body, key) if noise else None
        deadline = self._clock() + s.deadline
        v2, v3, v2_again = await asyncio.gather(
            self._until_final(lambda: sides.legacy_progress(legacy_id, key), deadline),
            self._until_final(lambda: sides.translation_progress(v3_id, key, fingerprint), deadline),
            self._until_final(lambda: sides.legacy_progress(twin, key), deadline) if twin else _none())
        differ = compare_outcomes(v2["status"], v3["status"])
        if differ is not None:
            why = f"{differ}" + (f" ({v3['failed_reason']})" if v3.get("failed_reason") else "")
            explained = Comparison("explained", f"{why}; the translation approximates {', '.join(approximated)}",
                                   explained_by=approximated) if approximated else Comparison("mismatch", why)
            return ShadowResult(fingerprint, legacy_id, v3_id, explained)
        if v2["status"] != 2:  # both failed: the same answer
            return ShadowResult(fingerprint, legacy_id, v3_id, Comparison("match", "both failed"))
        v2_png = await sides.legacy_image(v2["imgs"][0])
        v3_png = await sides.translation_image(v3_id, v3, fingerprint)
        comparison, heat = await self._local(compare_images, v2_png, v3_png, s.thresholds, approximated)
        floor = None
        if v2_again is not None and v2_again["status"] == 2:
            floor, _ = await self._local(compare_images, v2_png, await sides.legacy_image(v2_again["imgs"][0]),
                                         s.thresholds, ())
        return ShadowResult(fingerprint, legacy_id, v3_id, comparison, noise=floor,
                            images=(v2_png, v3_png, heat) if comparison.outcome != "match" else None)

    async def _until_final(self, poll: Callable[[], Awaitable[dict]], deadline: float) -> dict:
        while True:
            data = await poll()
            if data.get("status") in FINAL:
                return data
            if self._clock() > deadline:
                raise TimeoutError("a side did not finish before the shadow's deadline")
            await asyncio.sleep(self._settings.poll_every)

    async def _local(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


async def _none() -> None:
    return None
