"""The embedded task store: one SQLite file (WAL), shared by every process on the machine.

Calls are short local transactions, made on the event loop; the lease is one conditional UPDATE,
so two workers (or two processes) never both change a task. `woken_at` holds a wake that came
while the task was leased, until the holder's save applies it.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from proxy.stores.base import TaskRecord

# `composed_tasks`, not the `tasks` table of releases before typed tasks: their rows can't be read
_SCHEMA = """
CREATE TABLE IF NOT EXISTS composed_tasks (
    task_id     TEXT PRIMARY KEY,
    doc         BLOB NOT NULL,
    state       TEXT NOT NULL,
    due_at      REAL NOT NULL,
    purge_at    REAL NOT NULL,
    lease_owner TEXT,
    lease_until REAL NOT NULL DEFAULT 0,
    woken_at    REAL
);
CREATE INDEX IF NOT EXISTS composed_tasks_due ON composed_tasks (state, due_at);
CREATE INDEX IF NOT EXISTS composed_tasks_purge_at ON composed_tasks (purge_at);
"""


def open_database(path: Path, schema: str) -> sqlite3.Connection:
    """An SQLite file as every embedded store opens it: autocommit, WAL (readers never wait for the
    writer, and every process on the machine shares it), a wait for a busy writer, its schema."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=5000")
    db.executescript(schema)
    return db


class SqliteTaskStore:
    def __init__(self, path: Path) -> None:
        self._db = open_database(path, _SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(composed_tasks)")}
        if "woken_at" not in columns:  # a data directory of a release before wakes
            with contextlib.suppress(sqlite3.OperationalError):  # another process added it first
                self._db.execute("ALTER TABLE composed_tasks ADD COLUMN woken_at REAL")

    async def create(self, task: TaskRecord, max_running: int | None = None) -> bool:
        # one statement, one write transaction: the count and the insert can't be split by another process
        cur = self._db.execute(
            "INSERT INTO composed_tasks (task_id, doc, state, due_at, purge_at) SELECT ?, ?, ?, ?, ?"
            " WHERE ? IS NULL OR (SELECT COUNT(*) FROM composed_tasks WHERE state = ?) < ?",
            (task.task_id, task.doc, _state(task), task.due_at, task.purge_at,
             max_running if task.running else None, _RUNNING, max_running),
        )
        return cur.rowcount == 1

    async def get(self, task_id: str) -> TaskRecord | None:
        row = self._db.execute("SELECT doc, state, due_at, purge_at FROM composed_tasks WHERE task_id = ?",
                               (task_id,)).fetchone()
        return TaskRecord(task_id, _text(row[0]), row[1] == _RUNNING, row[2], row[3]) if row else None

    async def acquire(self, task_id: str, owner: str, now: float, seconds: float) -> bool:
        cur = self._db.execute(
            "UPDATE composed_tasks SET lease_owner = ?, lease_until = ?, woken_at = NULL"
            " WHERE task_id = ? AND (lease_until < ? OR lease_owner = ?)",
            (owner, now + seconds, task_id, now, owner),
        )
        return cur.rowcount == 1

    async def save(self, task: TaskRecord, owner: str) -> bool:
        cur = self._db.execute(
            "UPDATE composed_tasks SET doc = ?, state = ?, due_at = MIN(?, COALESCE(woken_at, ?)), purge_at = ?,"
            " lease_owner = NULL, lease_until = 0, woken_at = NULL WHERE task_id = ? AND lease_owner = ?",
            (task.doc, _state(task), task.due_at, task.due_at, task.purge_at, task.task_id, owner),
        )
        return cur.rowcount == 1

    async def release(self, task_id: str, owner: str) -> None:
        self._db.execute(
            "UPDATE composed_tasks SET lease_owner = NULL, lease_until = 0 WHERE task_id = ? AND lease_owner = ?",
            (task_id, owner),
        )

    async def wake(self, task_id: str, at: float) -> None:
        self._db.execute(
            "UPDATE composed_tasks SET due_at = MIN(due_at, ?), woken_at = CASE WHEN lease_owner IS NULL"
            " THEN NULL ELSE MIN(COALESCE(woken_at, ?), ?) END WHERE task_id = ? AND state = ?",
            (at, at, at, task_id, _RUNNING),
        )

    async def due(self, now: float, limit: int) -> list[str]:
        rows = self._db.execute(
            "SELECT task_id FROM composed_tasks WHERE state = ? AND due_at <= ? AND lease_until < ?"
            " ORDER BY due_at LIMIT ?", (_RUNNING, now, now, limit),
        )
        return [r[0] for r in rows]

    async def purgeable(self, now: float) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT task_id FROM composed_tasks WHERE purge_at < ?", (now,))]

    async def delete(self, task_id: str) -> None:
        self._db.execute("DELETE FROM composed_tasks WHERE task_id = ?", (task_id,))

    async def reachable(self) -> bool:
        return True  # a file in this process's data directory

    async def close(self) -> None:
        self._db.close()


_RUNNING = "running"


def _state(task: TaskRecord) -> str:
    return _RUNNING if task.running else "ended"


def _text(doc: str | bytes) -> str:
    return doc.decode() if isinstance(doc, bytes) else doc
