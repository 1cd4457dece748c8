"""The task engine: composed tasks advance in the background; a poll only reads its task.

Each process runs one worker (`run`). It takes the tasks that are due from the task store, each
under its lease, and moves each one a step: read its current V3 jobs, submit the next job of a
chain, and once every branch is done, fetch the results, compose them in the executor, restore
faces, store the PNG. When it looks again is set by V3's eta and the task's age, not by how often
clients poll. A poll answers from the stored task at once; it may wake the worker, never waits.

A failure that can't heal (an image that is refused, undecodable or too large, a V3 job that
failed) ends the task at once; a rate limit or an outage at V3 (`V3Error.transient`) is waited out,
with back-off, until V3 has been out of reach for the outage grace (then status 3, saying so) or
the task's deadline comes (status 4). The outage clock is part of the task, so a process taking the
task over carries it on.

Running tasks are capped across every process on the task store (each keeps its input image until
it is composed): a submission past the cap is refused before V3 is asked. Once V3 has accepted a
task's first job, the task is kept, whatever happens to its other branches: a charged job is never
left without its task.

A V3 webhook may reach any process (with Redis, any replica): the result is kept where the task's
next step finds it, and the task falls due at once in the task store, for whichever process moves it.

The caller's key is never stored. The engine holds each running task's key in memory, given by
the submission and refreshed by every poll, so a task whose process died carries on in the next
process one of its polls reaches, once the dead process's lease has lapsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pybase64
import structlog

from proxy.compose.faces import NO_FACES, FaceRestorationError, FaceRestorer
from proxy.compose.fetch import FetchError, ImageFetcher
from proxy.compose.images import PNG_LEVEL, ImageTooLarge, compose, v3_input_png
from proxy.compose.task import ComposedTask, TaskState, new_task_id
from proxy.errors import StoreUnavailable, V2Code, V2Error, V2Status
from proxy.redact import redact
from proxy.stores import ResultStore, TaskStore
from proxy.translate.plan import Plan
from proxy.translate.progress import v2_progress
from proxy.translate.steps import ReadInput, V3Job
from proxy.v3.breaker import BreakerState
from proxy.v3.client import V3Client
from proxy.v3.errors import V3BadReply, V3Error, V3StatusError, V3Timeout, V3Unreachable
from proxy.v3.models import TaskResult
from proxy.v3.payload import UpscaleBody
from proxy.webhooks import WebhookTokens

if TYPE_CHECKING:
    from proxy.stores.redis import RedisSharedResults

log = structlog.get_logger("proxy")
V3_JOB_SECONDS = 5.0  # a first guess at one V3 job, until V3's own eta replaces it
STORE_RETRY = 0.25  # seconds between a submission's tries of an unavailable store
STORE_RETRY_STEP = 1.0  # seconds before a step the store cut short is taken again
MAX_DELIVERED = 100_000  # webhook results waiting for their task's next step, in this process


class _Unconfirmed(Exception):
    """A submission that may have reached V3 without its reply reaching us: never sent again."""


# failures of the image work that no retry can mend: the task ends with them
_FINAL_FAILURES = (FetchError, ImageTooLarge, FaceRestorationError, OSError, ValueError)


@dataclass(frozen=True)
class EngineSettings:
    deadline: float  # seconds from submission until a task times out (V2 status 4)
    lease: float  # seconds a worker may hold a task while it moves it a step
    max_pending: int  # compositions at once in this process
    keep_finished: float = 3600.0  # seconds a failed or timed-out task still answers its polls
    webhook_fallback: float = 30.0  # with webhooks: seconds before V3 is asked after all
    tick: float = 0.1  # how often the worker looks for due tasks when nothing wakes it
    min_wait: float = 0.1  # bounds of the time between two looks at one task
    max_wait: float = 5.0
    batch: int = 64  # due tasks taken per look
    stop_grace: float = 3.0  # at shutdown, seconds steps in flight may take to end before they are cut
    png_compress_level: int = PNG_LEVEL  # zlib level of the composed PNG (Settings.png_compress_level)
    store_wait: float = 5.0  # seconds a submission waits for an unavailable store (Settings.redis_timeout)
    max_tasks: int | None = None  # running tasks across the task store; past it, submissions get code 5
    outage_grace: float = 300.0  # seconds V3 may stay out of reach of a task before the task fails
    breaker_cooldown: float = 10.0  # the V3 breaker's: no back-off is longer while it is open


class TaskEngine:
    def __init__(self, v3: V3Client, tasks: TaskStore, results: ResultStore, fetcher: ImageFetcher,
                 executor: Executor, settings: EngineSettings, status_table: dict[str, int],
                 faces: FaceRestorer = NO_FACES, webhooks: WebhookTokens | None = None,
                 clock: Callable[[], float] = time.time,
                 on_state: Callable[[str], None] | None = None,
                 shared: RedisSharedResults | None = None,
                 on_evicted: Callable[[], None] | None = None) -> None:
        self._v3, self._tasks, self._results, self._fetcher = v3, tasks, results, fetcher
        self._executor, self._settings, self._status = executor, settings, status_table
        self.faces, self._webhooks = faces, webhooks
        self._clock = clock
        self._on_state = on_state or (lambda state: None)
        self._on_evicted = on_evicted or (lambda: None)  # a delivered result dropped, past MAX_DELIVERED
        self._owner = uuid.uuid4().hex  # this process, as a lease holder
        self._keys: dict[str, str] = {}  # running task -> its caller's key: memory only, never stored
        self._busy: set[str] = set()  # tasks this process is moving right now
        self._delivered: dict[str, TaskResult] = {}  # V3 job -> its result, sent to the webhook
        self._shared = shared  # with Redis: delivered results, for whichever replica moves the task
        self._news: set[str] = set()  # tasks with a delivered result not yet looked at
        self._steps: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(settings.max_pending)
        self.compose = compose  # the composition, run in the executor (a test may hold it)

    # --- what the handlers call ---------------------------------------------------------------

    async def v3_input(self, image_b64: memoryview | bytes, read: ReadInput) -> bytes:
        """The input as a model gets it (RGB pixels only, as the release read it), for V3."""
        return pybase64.b64encode(await self._v3_input_png(pybase64.b64decode(image_b64), read))

    async def _v3_input_png(self, source: bytes, read: ReadInput) -> bytes:
        """Decoding the whole input, where the probe read its header only: pixels it can't decode
        are the client's error (code 6), not ours."""
        try:
            return await self._local(v3_input_png, source, read)
        except (OSError, ValueError) as e:  # ImageTooLarge is a ValueError
            raise V2Error(V2Code.PARAM_RANGE_OUT_OF_LIMIT, f"image: could not be decoded ({e})") from None

    async def submit(self, plan: Plan, image_b64: memoryview | bytes, key: str,
                     fingerprint: str) -> tuple[str, list[str]]:
        """Store the task and submit the first V3 job of each branch. -> (V2 task id, V3 job ids)"""
        task = self._new_task(plan, fingerprint)
        # the task takes its place first: past the cap, or with the store down (Redis) for longer
        # than `store_wait`, the submission gets code 5 before V3 is asked, and so before anything
        # is charged; a store that is back within it (a Redis restart) costs the client a wait only
        if not await self._stored(self._tasks.create, task.record(), self._settings.max_tasks):
            raise V2Error(V2Code.HOST_UNAVAILABLE, f"the proxy has {self._settings.max_tasks} composed tasks "
                          "running, as many as it takes (UPSCALE_PROXY_COMPOSE_MAX_TASKS): retry later")
        # held as a step holds a task until its first jobs are stored: a webhook that comes
        # meanwhile wakes its next step (kept in `_news`, or in the store until the save)
        self._busy.add(task.task_id)
        try:
            if not await self._stored(self._tasks.acquire, task.task_id, self._owner, self._clock(),
                                      self._settings.lease):
                raise RuntimeError("a new task's lease was taken")
            source = pybase64.b64decode(image_b64)
            if plan.v3_input == "pixels" and any(b.v3_jobs for b in plan.branches):
                image_b64 = pybase64.b64encode(await self._v3_input_png(source, plan.read))
            await self._stored(self._results.put, f"{task.task_id}.input", source)
            accepted = await self._submit_firsts(task, image_b64, key)
            if not await self._tasks.save(task.record(), self._owner):
                raise RuntimeError("a new task's lease lapsed before its jobs were stored")
        except BaseException:
            with contextlib.suppress(Exception):
                await self._results.delete(f"{task.task_id}.input")
            with contextlib.suppress(Exception):
                await self._tasks.delete(task.task_id)
            raise
        finally:
            self._busy.discard(task.task_id)
        self._on_state(TaskState.RUNNING)
        if task.state == TaskState.RUNNING:
            self._keys[task.task_id] = key
            self._wake.set()
        else:  # V3 took a branch, then refused another: the task ends, its first poll says why
            self._on_state(task.state)
        return task.task_id, accepted

    def _new_task(self, plan: Plan, fingerprint: str) -> ComposedTask:
        now = self._clock()
        longest = max((len(b.v3_jobs) for b in plan.branches), default=0)
        wait = self._settings.webhook_fallback if self._webhooks and longest else self._settings.min_wait
        return ComposedTask(
            task_id=new_task_id(), fingerprint=fingerprint, plan=plan, created=now,
            eta=longest * V3_JOB_SECONDS + 1, eta_at=now,
            deadline=now + self._settings.deadline, due_at=now + wait,
            purge_at=now + self._settings.deadline + self._settings.keep_finished,
            jobs=[[] for _ in plan.branches], jobs_done=[0] * len(plan.branches),
            outputs=[None] * len(plan.branches), started=not any(b.v3_jobs for b in plan.branches),
        )

    async def _submit_firsts(self, task: ComposedTask, image_b64: memoryview | bytes, key: str) -> list[str]:
        """The first job of each branch, one after the other. -> the job ids V3 accepted

        A refusal of the first is the client's to hear, and nothing was charged. Once a job is
        accepted the task is kept with it: a later branch V3 turned away is treated as in a step
        (a rate limit or an outage is waited out and the worker submits it; a refusal ends the task)."""
        accepted: list[str] = []
        for b, branch in enumerate(task.plan.branches):
            if not branch.v3_jobs:
                continue
            body = self._body(branch.v3_jobs[0], image_b64, task.task_id, task.fingerprint)
            try:
                job_id, _ = await self._v3.submit(body, key)
            except V3Error as e:
                if not accepted:
                    raise
                self._step_failed(task, _Unconfirmed(1) if _unconfirmed(e) else e, key)
                break
            task.jobs[b].append(job_id)
            accepted.append(job_id)
        return accepted

    async def _stored(self, call, *args):
        """A store call of a submission, tried again while the store is unavailable, for up to
        `store_wait` seconds (a Redis restart takes a few), before V3 is asked anything."""
        give_up = time.monotonic() + self._settings.store_wait
        while True:
            try:
                return await call(*args)
            except StoreUnavailable:
                if time.monotonic() >= give_up:
                    raise
                await asyncio.sleep(STORE_RETRY)

    async def deliver(self, task_id: str, result: TaskResult) -> None:
        """A V3 job's result, sent to the webhook: the task's next step reads it, not V3. With
        the shared tier (Redis) it is kept there, and the task falls due now in the task store, for
        whichever replica holds it; else (or if Redis failed) in this process."""
        job_id = result.task.task_id
        if self._shared is not None:
            if await self._shared.put(_delivered_key(job_id), result.model_dump_json().encode(),
                                      self._settings.deadline):
                try:
                    await self._tasks.wake(task_id, self._clock())
                except Exception as e:  # its step comes at the webhook fallback instead
                    log.warning("a delivered result could not wake its task", task_id=task_id, error=str(e))
                self._news.add(task_id)
                self._wake.set()
                return
        self._delivered.pop(job_id, None)  # a webhook sent again counts as the newest
        if len(self._delivered) >= MAX_DELIVERED:  # the oldest goes: its task asks V3 at its fallback
            del self._delivered[next(iter(self._delivered))]
            self._on_evicted()
        self._delivered[job_id] = result
        self._news.add(task_id)
        self._wake.set()

    async def progress(self, task_id: str, key: str, fingerprint: str, image_url: str) -> dict | None:
        """The V2 progress data of a composed task, from what is stored; None if there is none."""
        task = ComposedTask.from_record(await self._tasks.get(task_id))
        if task is None:
            return None
        if task.fingerprint != fingerprint:
            raise V2Error(V2Code.TASK_ID_NOT_EXIST, "task_id: no such task")
        now = self._clock()
        if task.state == TaskState.RUNNING:
            self._keys[task_id] = key  # this process can move it on, should its owner be gone
            if task.due_at <= now:
                self._wake.set()
        return _data(task, image_url, now)

    async def image(self, task_id: str, fingerprint: str | None = None) -> bytes | None:
        """The composed PNG while it is downloadable; None once expired or never made, or when the
        download carries another key than the task's (one without a key is the URL's own: V2's
        image URLs needed none, and the task id is unguessable)."""
        task = ComposedTask.from_record(await self._tasks.get(task_id))
        if task is None or task.state != TaskState.SUCCEEDED or self._clock() > task.expires_at:
            return None
        if fingerprint is not None and fingerprint != task.fingerprint:
            return None
        return await self._results.get(f"{task_id}.png")

    async def sweep(self, now: float) -> int:
        """Remove tasks past their purge time (expired images included) and their blobs."""
        gone = await self._tasks.purgeable(now)
        for task_id in gone:
            await self._results.delete(f"{task_id}.png")
            await self._results.delete(f"{task_id}.input")
            await self._tasks.delete(task_id)
            self._keys.pop(task_id, None)
        return len(gone)

    # --- the worker -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Move due tasks on until cancelled; then let go of the tasks being moved."""
        try:
            while True:
                self._wake.clear()
                try:
                    self._start_steps(await self._tasks.due(self._clock(), self._settings.batch))
                except Exception:  # the store failed this once: the worker must outlive it
                    log.exception("task engine could not read due tasks")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._settings.tick)
        finally:
            # steps in flight get a moment to end on their own: a V3 submission cut off before its
            # reply is read would be submitted again by the next process (and charged twice)
            if self._steps:
                await asyncio.wait(list(self._steps), timeout=self._settings.stop_grace)
            for step in list(self._steps):
                step.cancel()
            if self._steps:
                await asyncio.wait(list(self._steps))

    def _start_steps(self, due: list[str]) -> None:
        """A step for each due task (and each with a webhook result) that this process can move."""
        news, self._news = self._news, {t for t in self._news if t in self._busy}  # busy: next time
        for task_id in [*news, *due]:
            if task_id in self._keys and task_id not in self._busy:
                self._busy.add(task_id)
                step = asyncio.create_task(self._step(task_id))
                self._steps.add(step)
                step.add_done_callback(self._steps.discard)

    async def _step(self, task_id: str) -> None:
        try:
            if not await self._tasks.acquire(task_id, self._owner, self._clock(), self._settings.lease):
                return
            task = ComposedTask.from_record(await self._tasks.get(task_id))
            if task is None or task.state != TaskState.RUNNING:
                await self._tasks.release(task_id, self._owner)
                return
            try:
                await self._advance(task, self._keys[task_id])
            except StoreUnavailable:
                raise  # the store, not the task: nothing of this step is saved, and it is taken again
            except Exception:  # a bug: end the task rather than retry it forever
                log.exception("task step failed", task_id=task_id)
                self._end(task, TaskState.FAILED, "internal error", self._clock())
            if not await self._tasks.save(task.record(), self._owner):
                log.warning("task lease lapsed before its step was stored", task_id=task_id)
            elif task.state != TaskState.RUNNING:
                self._keys.pop(task_id, None)
                self._on_state(task.state)
        except asyncio.CancelledError:  # shutting down: another process may carry on at once
            with contextlib.suppress(Exception):
                await self._tasks.release(task_id, self._owner)
            raise
        except Exception as e:  # the store failed (Redis down): this process steps the task again soon
            log.warning("task step could not reach the task store", task_id=task_id, error=str(e))
            asyncio.get_running_loop().call_later(STORE_RETRY_STEP, self._again, task_id)
        finally:
            self._busy.discard(task_id)

    def _again(self, task_id: str) -> None:
        """A step cut short by the store: taken again (the lease it may still hold is this process's)."""
        self._news.add(task_id)
        self._wake.set()

    async def _advance(self, task: ComposedTask, key: str) -> None:
        """One step of a running task, under its lease; it changes `task`, the caller stores it."""
        now = self._clock()
        if now > task.deadline:
            return self._end(task, TaskState.TIMEOUT, "the task did not finish before its deadline", now)
        try:
            waiting = await self._follow_jobs(task, key)
            task.retries, task.unreachable_since = 0, None  # V3 answered: any outage is over
            if task.state == TaskState.RUNNING and waiting is None:
                await self._compose(task)
            elif task.state == TaskState.RUNNING:
                task.due_at = self._clock() + self._wait(task, waiting)
        except (_Unconfirmed, V3Error, *_FINAL_FAILURES) as e:
            self._step_failed(task, e, key)
        task.advance_progress(task.work_done)
        return None

    def _step_failed(self, task: ComposedTask, e: Exception, key: str) -> None:
        """What a failure of a step (or of a later branch's submission) does to the task."""
        now = self._clock()
        if isinstance(e, _Unconfirmed):
            self._end(task, TaskState.FAILED, f"V3 may have received pass {e.args[0]} but did not confirm it; "
                      "it is not sent again, as a second one would be charged twice", now)
        elif isinstance(e, V3Error) and e.transient:  # rate limited, down, too slow: it may pass
            self._back_off(task, redact(str(e), key))
        elif isinstance(e, V3Error):
            said = redact(_refusal(e), key)
            self._end(task, TaskState.FAILED, f"V3 refused a job: {said}", now)
        else:
            log.warning("composition failed", task_id=task.task_id, error=str(e))
            self._end(task, TaskState.FAILED, f"composition failed: {e}", now)

    async def _follow_jobs(self, task: ComposedTask, key: str) -> list[float] | None:
        """Read each branch's current V3 job; after one that succeeded, submit the next of its
        chain on its image. -> the etas of the jobs still running, or None when all are done.

        What is learnt is written on `task` before anything else can fail, so that a step cut
        short (a rate limit on the next submission) is taken up where it stopped."""
        # with webhooks, V3 is asked only once a job's webhook is overdue (the task fell due)
        ask = self._webhooks is None or task.due_at <= self._clock()
        current = [b for b, jobs in enumerate(task.jobs) if task.jobs_done[b] < len(jobs)]
        results = await asyncio.gather(*(self._job_result(task.jobs[b][-1], key, ask) for b in current))
        etas = []
        for b, result in zip(current, results, strict=True):
            if result is None:  # its webhook hasn't come yet
                continue
            status = V2Status(self._status.get(result.task.status, V2Status.RUNNING))
            task.started = task.started or status != V2Status.INITIALIZING
            if status == V2Status.FAILED:
                self._end(task, TaskState.FAILED, redact(result.task.reason, key) or "a V3 job failed",
                          self._clock())
                return etas
            task.executed_ms = task.executed_ms or result.extra.debug_info.execute_time_ms
            if status == V2Status.SUCCESSFUL:
                task.jobs_done[b] += 1
                task.outputs[b] = _image_url(result)
            else:
                etas.append(result.task.eta)
        for b, branch in enumerate(task.plan.branches):
            if task.jobs_done[b] == len(task.jobs[b]) < len(branch.v3_jobs):  # chain the next job
                job = branch.v3_jobs[len(task.jobs[b])]
                image_b64 = await self._job_input(task, b)
                try:
                    job_id, _ = await self._v3.submit(
                        self._body(job, image_b64, task.task_id, task.fingerprint), key)
                except V3Error as e:
                    if _unconfirmed(e):
                        raise _Unconfirmed(len(task.jobs[b]) + 1) from e
                    raise  # it never reached V3, or V3 said no: safe to submit again after a back-off
                task.jobs[b].append(job_id)
                etas.append(0.0)
        done = all(task.jobs_done[b] == len(branch.v3_jobs) for b, branch in enumerate(task.plan.branches))
        return None if done else etas

    async def _job_input(self, task: ComposedTask, b: int) -> bytes:
        """The base64 image of branch `b`'s next job: the last pass's result, or for a first job
        (one V3 turned away at the submission) the task's input, as V3 got it then."""
        if task.jobs[b]:
            return pybase64.b64encode(await self._fetcher.fetch(task.outputs[b]))
        source = await self._results.get(f"{task.task_id}.input")
        if source is None:
            raise FetchError("the task's input is gone")
        if task.plan.v3_input == "pixels":
            source = await self._local(v3_input_png, source, task.plan.read)
        return pybase64.b64encode(source)

    async def _job_result(self, job_id: str, key: str, ask: bool) -> TaskResult | None:
        """A job's result: the one V3 sent to the webhook (to this process, else to any replica:
        the shared tier), else (when `ask`) V3's answer to a task-result call."""
        delivered = self._delivered.pop(job_id, None)
        if delivered is None and self._shared is not None:
            doc = await self._shared.pop(_delivered_key(job_id))
            if doc is not None:
                with contextlib.suppress(ValueError):  # not one of ours: as if absent
                    delivered = TaskResult.model_validate_json(doc)
        if delivered is not None or not ask:
            return delivered
        return (await self._v3.task_result(job_id, key))[0]

    def _body(self, job: V3Job, image_b64: memoryview | bytes, task_id: str, fingerprint: str) -> UpscaleBody:
        webhook = self._webhooks.issue(fingerprint, task_id) if self._webhooks else None
        return UpscaleBody(job.model, job.scale_factor, image_b64, webhook_url=webhook)

    async def _compose(self, task: ComposedTask) -> None:
        if self._slots.locked():  # this process composes enough already: look again shortly
            task.due_at = self._clock() + self._settings.min_wait
            return
        async with self._slots:
            finals = []
            for url in task.outputs:
                finals.append(await self._fetcher.fetch(url) if url else None)
                task.fetched += 1 if url else 0
            source = await self._results.get(f"{task.task_id}.input")
            if source is None:
                raise FetchError("the task's input is gone")
            started = time.perf_counter()
            png = await self._local(self.compose, task.plan, source, finals, self._settings.png_compress_level)
            log.info("composed", task_id=task.task_id, size=list(task.plan.output_size),
                     compose_ms=round((time.perf_counter() - started) * 1000, 1))
            faces = task.plan.faces
            if faces:  # last, as V2 ran it: after the upscale, on the operator's A1111 server
                png = await self.faces.restore(png, gfpgan_visibility=faces.gfpgan_visibility,
                                               codeformer_visibility=faces.codeformer_visibility,
                                               codeformer_weight=faces.codeformer_weight)
        await self._results.put(f"{task.task_id}.png", png, ttl=task.plan.ttl)
        await self._results.delete(f"{task.task_id}.input")
        now = self._clock()
        task.expires_at = now + task.plan.ttl
        self._end(task, TaskState.SUCCEEDED, "", now, purge_at=task.expires_at)

    def _end(self, task: ComposedTask, state: TaskState, reason: str, now: float,
             purge_at: float | None = None) -> None:
        task.state, task.reason, task.eta = state, reason, 0.0
        task.finished_ms = int(now * 1000)
        task.purge_at = purge_at or now + self._settings.keep_finished

    def _wait(self, task: ComposedTask, etas: list[float]) -> float:
        """Seconds until the next look: half V3's eta while it gives one (its etas are whole
        seconds, rounded up), else a share of the task's age (young tasks are looked at often, old
        ones less), within the bounds."""
        s = self._settings
        age = self._clock() - task.created
        wait = max(etas) / 2 if etas and max(etas) > 0 else age / 4
        chains = [len(b.v3_jobs) - done for b, done in zip(task.plan.branches, task.jobs_done, strict=True)]
        task.estimate_eta(max(max(etas, default=0), 1) * max(max(chains), 1) + 1, self._clock())
        if self._webhooks:  # V3 will say when a job is done: asking it is the fallback
            return s.webhook_fallback
        return min(max(wait, s.min_wait), s.max_wait)

    def _back_off(self, task: ComposedTask, why: str) -> None:
        """V3 can't be reached (or rate-limits): look again after a back-off, doubling, jittered, and
        no longer than the breaker's cool-down while it is open (V3 is probed again by then). Past
        the outage grace, counted from the first failure in a row, the task fails saying so."""
        s, now = self._settings, self._clock()
        if task.unreachable_since is None:
            task.unreachable_since = now
        since = task.unreachable_since
        if now - since >= s.outage_grace:
            return self._end(task, TaskState.FAILED, f"V3 could not be reached for {now - since:.0f} s: {why}", now)
        task.retries += 1
        wait = min(s.max_wait * 6, s.min_wait * 2 ** task.retries)
        if self._v3.breaker.state != BreakerState.CLOSED:
            wait = min(wait, s.breaker_cooldown)
        task.due_at = min(now + random.uniform(wait / 2, wait), since + s.outage_grace)
        log.info("task waits for V3", task_id=task.task_id, why=why, retries=task.retries)
        return None

    async def _local(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


def _unconfirmed(e: V3Error) -> bool:
    """A submission that failed this way may have reached V3, and been charged."""
    return isinstance(e, (V3Timeout, V3BadReply)) or (isinstance(e, V3Unreachable) and e.sent)


def _refusal(e: V3Error) -> str:
    """What V3 said when it refused a call."""
    if isinstance(e, V3StatusError):
        return ": ".join(p for p in (e.reason, e.message) if p) or f"HTTP {e.status}"
    return str(e)


def _delivered_key(job_id: str) -> str:
    """The shared tier's key of a V3 job's delivered result."""
    return f"job:{job_id}"


def _image_url(result: TaskResult) -> str:
    if not result.images:
        raise FetchError("a V3 job succeeded without an image")
    return result.images[0].image_url


def _data(task: ComposedTask, image_url: str, now: float) -> dict:
    state, status, progress, eta = task.state, task.state.v2_status, 1.0, 0.0
    reason = task.reason
    if state == TaskState.RUNNING and now > task.deadline:  # the worker will end it; say so now
        state, status, reason = TaskState.TIMEOUT, V2Status.TIMEOUT, "the task did not finish before its deadline"
    elif state == TaskState.RUNNING:
        status = V2Status.RUNNING if task.started else V2Status.INITIALIZING
        progress, eta = task.progress, max(math.ceil(task.eta_now(now)), 1)
    submit_ms = int(task.created * 1000)
    return v2_progress(
        status=int(status), progress=_number(progress), eta=int(eta),
        imgs=[image_url] if state == TaskState.SUCCEEDED else None,
        failed_reason=reason if state in (TaskState.FAILED, TaskState.TIMEOUT) else "",
        submit_ms=submit_ms, execution_ms=task.executed_ms or (submit_ms if task.finished_ms else 0),
        finish_ms=task.finished_ms,
    )


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x
