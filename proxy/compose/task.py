"""A composed task as it is stored: typed, with its state, its V3 jobs, its times and its Plan.

Only the task engine changes a task, and only under the task's lease; a poll only reads it. The
caller's key is never part of it (see `engine.py`).
"""

from __future__ import annotations

import os
import uuid
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from proxy.errors import V2Status
from proxy.stores.base import TaskRecord
from proxy.translate.plan import Plan


class TaskState(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMEOUT = "timeout"

    @property
    def v2_status(self) -> V2Status:
        return _V2_STATUS[self]


_V2_STATUS = {TaskState.RUNNING: V2Status.RUNNING, TaskState.SUCCEEDED: V2Status.SUCCESSFUL,
              TaskState.FAILED: V2Status.FAILED, TaskState.TIMEOUT: V2Status.TIMEOUT}


class ComposedTask(BaseModel):
    model_config = ConfigDict(validate_assignment=False)

    task_id: str
    fingerprint: str  # HMAC of the key that created it: another key can't see it
    plan: Plan
    created: float  # epoch seconds
    deadline: float  # past it, the task ends with V2 status 4
    due_at: float  # when the engine next looks at it
    purge_at: float  # when the task and its blobs may be removed
    state: TaskState = TaskState.RUNNING
    reason: str = ""  # why it failed, for `failed_reason`
    jobs: list[list[str]] = []  # per branch of the plan, the V3 job ids submitted so far
    jobs_done: list[int] = []  # per branch, how many of those have succeeded
    outputs: list[str | None] = []  # per branch, the image URL of its last V3 job that succeeded
    fetched: int = 0  # V3 results fetched for the composition
    started: bool = False  # V3 has started on it (V2 status 1 rather than 0)
    progress: float = 0.0  # the share of the work done, never decreasing
    eta: float = 0.0  # seconds left, as estimated at `eta_at`
    eta_at: float = 0.0
    retries: int = 0  # back-offs in a row (V3 rate limits, outages)
    # when V3 was first out of reach in a row of failures (None: it answered last time); stored,
    # so that a process taking the task over counts the same outage (records before it: None)
    unreachable_since: float | None = None
    executed_ms: int = 0
    finished_ms: int = 0
    expires_at: float = 0.0  # when the composed image stops being downloadable

    @property
    def work(self) -> int:
        """Units of work: every V3 job of every branch, a fetch per branch with jobs, the
        composition, and the face restoration."""
        chains = [len(b.v3_jobs) for b in self.plan.branches]
        return sum(chains) + sum(1 for n in chains if n) + 1 + (1 if self.plan.faces else 0)

    @property
    def work_done(self) -> int:
        return sum(self.jobs_done) + self.fetched

    def eta_now(self, now: float) -> float:
        """Seconds left: the last estimate, counted down since it was made."""
        return max(self.eta - (now - self.eta_at), 0.0)

    def estimate_eta(self, seconds: float, now: float) -> None:
        """A new estimate; it lowers the countdown, never raises it (an eta that jumps up reads as
        a stall to a client's progress bar)."""
        self.eta, self.eta_at = min(self.eta_now(now), seconds), now

    def record(self) -> TaskRecord:
        """The task as the stores hold it."""
        return TaskRecord(self.task_id, self.model_dump_json(), self.state == TaskState.RUNNING,
                          self.due_at, self.purge_at)

    @classmethod
    def from_record(cls, record: TaskRecord | None) -> ComposedTask | None:
        return cls.model_validate_json(record.doc) if record is not None else None

    def advance_progress(self, units_done: int) -> None:
        """Progress as the share of the work done; it never goes back, and is 1 only when done."""
        share = min(units_done / self.work, 0.99) if self.state == TaskState.RUNNING else 1.0
        self.progress = max(self.progress, round(share, 2))


def new_task_id() -> str:
    """A UUID of version 8 (RFC 9562): V3's ids are version 4, so a poll can tell ours at a glance."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x80
    raw[8] = (raw[8] & 0x3F) | 0x80
    return str(uuid.UUID(bytes=bytes(raw)))


def is_composed_id(task_id: str) -> bool:
    return len(task_id) == 36 and task_id[14] == "8"
