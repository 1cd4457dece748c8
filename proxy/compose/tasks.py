"""Composed tasks: submit the V3 jobs of a Plan, follow them on each poll, compose the result once.

State lives in the plan store, so any process can answer any poll and a restarted proxy carries
on. Every change to a task (the next native 4x pass, the composition, a final status) is made
under the task's lease, so concurrent polls submit each pass once and compose once. The caller's
key is never stored: each poll brings it, and the task is bound to its fingerprint.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import pybase64
import structlog

from proxy.compose.faces import NO_FACES, FaceRestorationError, FaceRestorer
from proxy.compose.fetch import FetchError, ImageFetcher
from proxy.compose.images import ImageTooLarge, compose, v3_input_png
from proxy.errors import V2Code, V2Error, V2Status
from proxy.stores import PlanStore, ResultStore, StoredTask
from proxy.translate.plan import Plan
from proxy.translate.steps import ReadInput
from proxy.translate.progress import v2_progress
from proxy.v3.client import V3Client
from proxy.v3.models import TaskResult
from proxy.v3.payload import UpscaleBody

log = structlog.get_logger("proxy")

RUNNING, SUCCEEDED, FAILED, TIMEOUT = "running", "succeeded", "failed", "timeout"
V2_STATUS = {RUNNING: 1, SUCCEEDED: 2, FAILED: 3, TIMEOUT: 4}
KEEP_FINISHED = 3600  # seconds a failed or timed-out task still answers its polls


def new_task_id() -> str:
    """A UUID of version 8 (RFC 9562): V3's ids are version 4, so a poll can tell ours at a glance."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x80
    raw[8] = (raw[8] & 0x3F) | 0x80
    return str(uuid.UUID(bytes=bytes(raw)))


def is_composed_id(task_id: str) -> bool:
    return len(task_id) == 36 and task_id[14] == "8"


@dataclass(frozen=True)
class TaskSettings:
    deadline: float  # seconds from submission until a task times out (V2 status 4)
    lease: float  # seconds a poll may hold a task while it works on it
    max_pending: int  # compositions queued or running at once in this process


class ComposedTasks:
    def __init__(self, v3: V3Client, plans: PlanStore, results: ResultStore, fetcher: ImageFetcher,
                 executor: Executor, settings: TaskSettings, status_table: dict[str, int],
                 faces: FaceRestorer = NO_FACES, on_state: Callable[[str], None] | None = None) -> None:
        self._v3, self._plans, self._results, self._fetcher = v3, plans, results, fetcher
        self._status = status_table  # V3 task status -> V2 status (mappings/task_status.toml)
        self._on_state = on_state or (lambda state: None)
        self.faces = faces
        self._executor = executor
        self._settings = settings
        self._owner = uuid.uuid4().hex  # this process, as a lease holder
        self._slots = asyncio.Semaphore(settings.max_pending)

    async def _local(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def v3_input(self, image_b64: memoryview | bytes, read: ReadInput) -> bytes:
        """The input as a model gets it (RGB pixels only, as the release read it), for V3."""
        return pybase64.b64encode(await self._local(v3_input_png, pybase64.b64decode(image_b64), read))

    async def submit(self, plan: Plan, image_b64: memoryview | bytes, key: str,
                     fingerprint: str) -> tuple[str, list[str]]:
        """Submit the first V3 job of each branch; store the task. -> (V2 task id, V3 job ids)"""
        task_id = new_task_id()
        source = pybase64.b64decode(image_b64)
        if plan.v3_input == "pixels" and any(b.v3_jobs for b in plan.branches):
            image_b64 = pybase64.b64encode(await self._local(v3_input_png, source, plan.read))
        firsts = await asyncio.gather(*(
            self._v3.submit(UpscaleBody(b.v3_jobs[0].model, b.v3_jobs[0].scale_factor, image_b64), key)
            for b in plan.branches if b.v3_jobs
        ))
        ids = iter(job_id for job_id, _ in firsts)
        now = time.time()
        doc = {
            "plan": plan.model_dump(mode="json"), "ttl": plan.ttl, "created": now,
            "deadline": now + self._settings.deadline, "state": RUNNING, "reason": "",
            "jobs": [[next(ids)] if b.v3_jobs else [] for b in plan.branches],
            "executed_ms": 0, "finished_ms": 0, "expires_at": 0,
        }
        await self._results.put(f"{task_id}.input", source)
        await self._plans.create(StoredTask(task_id, fingerprint, doc, doc["deadline"] + KEEP_FINISHED))
        self._on_state(RUNNING)
        return task_id, [job_id for job_id, _ in firsts]

    async def progress(self, task_id: str, key: str, fingerprint: str, image_url: str) -> dict | None:
        """The V2 progress data of a composed task; None if no such task is stored."""
        task = await self._plans.get(task_id)
        if task is None:
            return None
        if task.fingerprint != fingerprint:
            raise V2Error(V2Code.TASK_ID_NOT_EXIST, "task_id: no such task")
        doc = task.doc
        if doc["state"] != RUNNING:
            return _data(doc, image_url)
        if time.time() > doc["deadline"]:
            return await self._finish(task, TIMEOUT, "the task did not finish before its deadline", image_url)
        plan = Plan.model_validate(doc["plan"])
        current = [jobs[-1] for b, jobs in zip(plan.branches, doc["jobs"], strict=True) if b.v3_jobs]
        results = iter(await asyncio.gather(*(self._v3.task_result(job, key) for job in current)))
        last: list[TaskResult | None] = [next(results)[0] if b.v3_jobs else None for b in plan.branches]
        for result in filter(None, last):
            if self._v2_status(result) == V2Status.FAILED:
                return await self._finish(task, FAILED, result.task.reason or "a V3 job failed", image_url)
            if not doc["executed_ms"] and result.extra.debug_info.execute_time_ms:
                doc["executed_ms"] = result.extra.debug_info.execute_time_ms
        succeeded = [r is None or self._v2_status(r) == V2Status.SUCCESSFUL for r in last]
        next_pass = any(ok and len(jobs) < len(b.v3_jobs)
                        for ok, jobs, b in zip(succeeded, doc["jobs"], plan.branches, strict=True))
        if (all(succeeded) or next_pass) and await self._plans.acquire(task_id, self._owner, self._settings.lease):
            try:
                await self._advance(task, plan, last, succeeded, key)
            finally:
                await self._plans.release(task_id, self._owner)
            task = await self._plans.get(task_id) or task
            if task.doc["state"] != RUNNING:
                return _data(task.doc, image_url)
        return _running(plan, task.doc, [self._v2_status(r) if r else None for r in last],
                        [r.task.eta for r in last if r])

    def _v2_status(self, result: TaskResult) -> V2Status:
        return V2Status(self._status.get(result.task.status, V2Status.RUNNING))  # unknown: still running

    async def _advance(self, task: StoredTask, plan: Plan, last: list[TaskResult | None],
                       succeeded: list[bool], key: str) -> None:
        """Under the lease: submit the next native 4x passes, or compose when every branch is done."""
        fresh = await self._plans.get(task.task_id)
        if fresh is None or fresh.doc["jobs"] != task.doc["jobs"] or fresh.doc["state"] != RUNNING:
            return  # another poll moved the task on while we looked at V3
        jobs = task.doc["jobs"]
        try:
            for b, (branch, result) in enumerate(zip(plan.branches, last, strict=True)):
                if result is not None and succeeded[b] and len(jobs[b]) < len(branch.v3_jobs):
                    image = await self._fetch(result)  # the next job in the chain runs on this output
                    job = branch.v3_jobs[len(jobs[b])]
                    job_id, _ = await self._v3.submit(
                        UpscaleBody(job.model, job.scale_factor, pybase64.b64encode(image)), key)
                    jobs[b].append(job_id)
                    succeeded[b] = False
            if not all(succeeded):
                await self._plans.save(task, self._owner)
                return
            if self._slots.locked():
                return  # this process is composing enough already; a later poll will do it
            async with self._slots:
                finals = [await self._fetch(r) if r is not None else None for r in last]
                source = await self._results.get(f"{task.task_id}.input")
                if source is None:
                    raise FetchError("the task's input is gone")
                started = time.perf_counter()
                png = await self._local(compose, plan, source, finals)
                log.info("composed", task_id=task.task_id, size=list(plan.output_size),
                         compose_ms=round((time.perf_counter() - started) * 1000, 1))
            if plan.faces:  # last, as V2 ran it: after the upscale, on the operator's A1111 server
                f = plan.faces
                png = await self.faces.restore(png, gfpgan_visibility=f.gfpgan_visibility,
                                               codeformer_visibility=f.codeformer_visibility,
                                               codeformer_weight=f.codeformer_weight)
            await self._results.put(f"{task.task_id}.png", png)
        except (FetchError, ImageTooLarge, FaceRestorationError, OSError, ValueError) as e:
            log.warning("composition failed", task_id=task.task_id, error=str(e))
            await self._mark(task, FAILED, f"composition failed: {e}")
            return
        now = time.time()
        task.doc["finished_ms"] = int(now * 1000)
        task.doc["expires_at"] = now + task.doc["ttl"]
        await self._mark(task, SUCCEEDED, "", purge_at=task.doc["expires_at"])
        await self._results.delete(f"{task.task_id}.input")

    async def _fetch(self, result: TaskResult) -> bytes:
        if not result.images:
            raise FetchError("a V3 job succeeded without an image")
        return await self._fetcher.fetch(result.images[0].image_url)

    async def _mark(self, task: StoredTask, state: str, reason: str, purge_at: float | None = None) -> None:
        task.doc.update(state=state, reason=reason)
        if state != SUCCEEDED:
            task.doc["finished_ms"] = int(time.time() * 1000)
        task.purge_at = purge_at or time.time() + KEEP_FINISHED
        await self._plans.save(task, self._owner)
        self._on_state(state)

    async def _finish(self, task: StoredTask, state: str, reason: str, image_url: str) -> dict:
        if await self._plans.acquire(task.task_id, self._owner, self._settings.lease):
            await self._mark(task, state, reason)
            return _data(task.doc, image_url)
        return _running(Plan.model_validate(task.doc["plan"]), task.doc, [], [])

    async def image(self, task_id: str) -> bytes | None:
        """The composed PNG while it is downloadable; None once expired or never made."""
        task = await self._plans.get(task_id)
        if task is None or task.doc["state"] != SUCCEEDED or time.time() > task.doc["expires_at"]:
            return None
        return await self._results.get(f"{task_id}.png")

    async def sweep(self, now: float) -> int:
        """Remove tasks past their purge time (expired images included) and their blobs."""
        gone = await self._plans.purgeable(now)
        for task_id in gone:
            await self._results.delete(f"{task_id}.png")
            await self._results.delete(f"{task_id}.input")
            await self._plans.delete(task_id)
        return len(gone)


def _data(doc: dict, image_url: str, status: int | None = None, progress: float = 1, eta: float = 0) -> dict:
    state = doc["state"]
    submit_ms = int(doc["created"] * 1000)
    finished = doc["finished_ms"]
    return v2_progress(
        status=V2_STATUS[state] if status is None else status, progress=progress, eta=eta,
        imgs=[image_url] if state == SUCCEEDED else None,
        failed_reason=doc["reason"] if state in (FAILED, TIMEOUT) else "",
        submit_ms=submit_ms, execution_ms=doc["executed_ms"] or (submit_ms if finished else 0), finish_ms=finished,
    )


def _running(plan: Plan, doc: dict, last: list[V2Status | None], etas: list[float]) -> dict:
    """Status 0 until V3 starts, then 1; progress counts finished V3 jobs (composing is one more).
    `last`: the V2 status of each branch's current V3 job (None: no V3 job)."""
    done = sum(len(jobs) - 1 for jobs in doc["jobs"] if jobs)
    done += sum(1 for status in last if status == V2Status.SUCCESSFUL)
    total = plan.v3_jobs + 1
    queued = bool(last) and all(status == V2Status.INITIALIZING for status in last)
    remaining_passes = plan.v3_jobs - done
    eta = max([*etas, 1]) * max(remaining_passes, 1) + 1
    progress = round(min(done / total, 0.99), 2)
    return _data(doc, "", status=0 if queued and not done else 1,
                 progress=int(progress) if progress == 0 else progress, eta=int(eta))
