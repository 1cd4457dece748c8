"""The store interfaces. A Redis implementation, for replicas on many machines, fits behind them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class StoredTask:
    """A composed task as stored: its id, the caller's key fingerprint, and an opaque document."""

    task_id: str
    fingerprint: str
    doc: dict  # the task's state, owned by proxy.compose
    purge_at: float  # epoch seconds after which the task and its blobs may be removed


class PlanStore(Protocol):
    async def create(self, task: StoredTask) -> None: ...

    async def get(self, task_id: str) -> StoredTask | None: ...

    async def acquire(self, task_id: str, owner: str, seconds: float) -> bool:
        """Take the task's lease (the right to change it) for `seconds`, unless another holds it."""

    async def save(self, task: StoredTask, owner: str) -> None:
        """Write the task and give the lease back (only the lease holder writes)."""

    async def release(self, task_id: str, owner: str) -> None: ...

    async def purgeable(self, now: float) -> list[str]: ...

    async def delete(self, task_id: str) -> None: ...

    async def close(self) -> None: ...


class ResultStore(Protocol):
    async def put(self, name: str, data: bytes) -> None: ...

    async def get(self, name: str) -> bytes | None: ...

    async def delete(self, name: str) -> None: ...
