"""The store interfaces: SQLite and files embedded (sqlite.py, files.py), Redis for replicas (redis.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """A composed task as a store holds it: an opaque document (its owner, proxy.compose, reads and
    writes it), and what a store indexes to find tasks that are due or may be purged."""

    task_id: str
    doc: str
    running: bool  # only running tasks are ever due
    due_at: float
    purge_at: float


class TaskStore(Protocol):
    """Composed tasks, their leases (who may change a task, until when) and which are due.

    Times are passed in (epoch seconds), never read from a clock here, so that tests control them.
    """

    async def create(self, task: TaskRecord, max_running: int | None = None) -> bool:
        """Store a new task. With `max_running`, a running task is refused (False, nothing stored)
        while that many are running already: counted here, the cap holds for every process."""

    async def get(self, task_id: str) -> TaskRecord | None: ...

    async def acquire(self, task_id: str, owner: str, now: float, seconds: float) -> bool:
        """Take the task's lease for `seconds`, unless another owner holds one that hasn't lapsed."""

    async def save(self, task: TaskRecord, owner: str) -> bool:
        """Write the task and give the lease back. Only the lease holder writes: False when
        `owner` no longer holds the lease (it lapsed and another took it), and nothing is written."""

    async def release(self, task_id: str, owner: str) -> None: ...

    async def wake(self, task_id: str, at: float) -> None:
        """Make a running task due by `at` at the latest (what it waits for has come). If a lease
        holder is moving it meanwhile, it is still due by `at` after the holder's save: the
        holder's step may have looked before it came."""

    async def due(self, now: float, limit: int) -> list[str]:
        """Running tasks whose `due_at` has come and whose lease is free, the most overdue first."""

    async def purgeable(self, now: float) -> list[str]: ...

    async def delete(self, task_id: str) -> None: ...

    async def reachable(self) -> bool:
        """Whether the store answers now (/readyz says so)."""
        ...

    async def close(self) -> None: ...


class ResultStore(Protocol):
    async def put(self, name: str, data: bytes, ttl: float | None = None) -> None:
        """Store `data` under `name`. A store with native expiry drops it after `ttl` seconds; the
        others keep it until it is deleted (the engine's sweep deletes what expired)."""

    async def get(self, name: str) -> bytes | None: ...

    async def delete(self, name: str) -> None: ...
