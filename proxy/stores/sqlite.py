"""The embedded plan store: one SQLite file (WAL), shared by every process on the machine.

Calls are short local transactions, made on the event loop; the lease is one conditional UPDATE,
so two polls (or two processes) never both change a task.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import orjson

from proxy.stores.base import StoredTask

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id     TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    doc         BLOB NOT NULL,
    purge_at    REAL NOT NULL,
    lease_owner TEXT,
    lease_until REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS tasks_purge_at ON tasks (purge_at);
"""


class SqlitePlanStore:
    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    async def create(self, task: StoredTask) -> None:
        self._db.execute(
            "INSERT INTO tasks (task_id, fingerprint, doc, purge_at) VALUES (?, ?, ?, ?)",
            (task.task_id, task.fingerprint, orjson.dumps(task.doc), task.purge_at),
        )

    async def get(self, task_id: str) -> StoredTask | None:
        row = self._db.execute(
            "SELECT task_id, fingerprint, doc, purge_at FROM tasks WHERE task_id = ?", (task_id,)
        ).fetchone()
        return StoredTask(row[0], row[1], orjson.loads(row[2]), row[3]) if row else None

    async def acquire(self, task_id: str, owner: str, seconds: float) -> bool:
        now = time.time()
        cur = self._db.execute(
            "UPDATE tasks SET lease_owner = ?, lease_until = ? WHERE task_id = ? AND lease_until < ?",
            (owner, now + seconds, task_id, now),
        )
        return cur.rowcount == 1

    async def save(self, task: StoredTask, owner: str) -> None:
        self._db.execute(
            "UPDATE tasks SET doc = ?, purge_at = ?, lease_owner = NULL, lease_until = 0"
            " WHERE task_id = ? AND lease_owner = ?",
            (orjson.dumps(task.doc), task.purge_at, task.task_id, owner),
        )

    async def release(self, task_id: str, owner: str) -> None:
        self._db.execute(
            "UPDATE tasks SET lease_owner = NULL, lease_until = 0 WHERE task_id = ? AND lease_owner = ?",
            (task_id, owner),
        )

    async def purgeable(self, now: float) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT task_id FROM tasks WHERE purge_at < ?", (now,))]

    async def delete(self, task_id: str) -> None:
        self._db.execute("DELETE FROM tasks WHERE task_id = ?", (task_id,))

    async def close(self) -> None:
        self._db.close()
