"""What replicas share about the migration: the stages set at run time, the side that took each
task, whether V2 is gone, and the last stage changes (for the dashboard). SQLite in the data
directory (one machine, `--workers`), or Redis (replicas), under the proxy's key prefix:

    <prefix>migration:changes      hash: fingerprint -> the rule set at run time (JSON)
    <prefix>migration:task:<id>    the side that took the task, expiring with the task
    <prefix>migration:v2-gone      why V2 is taken to be gone, once it is
    <prefix>migration:events       list: the last EVENTS stage changes, newest first (JSON)
    <prefix>migration:comparisons  list: the last COMPARISONS shadow comparisons, newest first (JSON)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import orjson

from proxy.migration.stages import SIDES, Rule, Side
from proxy.stores.sqlite import open_database

if TYPE_CHECKING:
    from redis.asyncio import Redis

EVENTS = 200  # stage changes kept for the dashboard
COMPARISONS = 1000  # shadow comparisons kept for the dashboard, newest first


class MigrationStore(Protocol):
    async def changes(self) -> dict[str, Rule]: ...

    async def set_change(self, fingerprint: str, rule: Rule | None) -> None:
        """A client's rule set at run time; None goes back to the file's."""

    async def remember_task(self, task_id: str, side: Side, ttl: float) -> None: ...

    async def side_of_task(self, task_id: str) -> Side | None: ...

    async def v2_gone(self) -> str | None:
        """Why V2 is taken to be gone, or None while it is not."""

    async def set_v2_gone(self, why: str) -> bool:
        """Say V2 is gone; False if another process said so first."""

    async def clear_v2_gone(self) -> bool:
        """V2 is back (the operator says so); False if it was not taken to be gone."""

    async def add_event(self, event: dict) -> None: ...

    async def events(self, limit: int = EVENTS) -> list[dict]: ...

    async def add_comparison(self, doc: dict) -> None: ...

    async def comparisons(self, limit: int = COMPARISONS) -> list[dict]:
        """The last shadow comparisons, newest first."""

    async def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS migration_changes (fingerprint TEXT PRIMARY KEY, doc BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS migration_tasks (task_id TEXT PRIMARY KEY, side TEXT NOT NULL, expires REAL NOT NULL);
CREATE INDEX IF NOT EXISTS migration_tasks_expires ON migration_tasks (expires);
CREATE TABLE IF NOT EXISTS migration_flags (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS migration_events (id INTEGER PRIMARY KEY AUTOINCREMENT, doc BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS migration_comparisons (id INTEGER PRIMARY KEY AUTOINCREMENT, doc BLOB NOT NULL);
"""


class SqliteMigrationStore:
    """Short local transactions on the event loop, as the task store's (a task's side is one row)."""

    def __init__(self, path: Path) -> None:
        self._db = open_database(path, _SCHEMA)
        self._writes = 0

    async def changes(self) -> dict[str, Rule]:
        return {fp: Rule.from_doc(orjson.loads(doc))
                for fp, doc in self._db.execute("SELECT fingerprint, doc FROM migration_changes")}

    async def set_change(self, fingerprint: str, rule: Rule | None) -> None:
        if rule is None:
            self._db.execute("DELETE FROM migration_changes WHERE fingerprint = ?", (fingerprint,))
        else:
            self._db.execute("INSERT INTO migration_changes VALUES (?, ?) ON CONFLICT (fingerprint) "
                             "DO UPDATE SET doc = excluded.doc", (fingerprint, orjson.dumps(rule.to_doc())))

    async def remember_task(self, task_id: str, side: Side, ttl: float) -> None:
        now = time.time()
        self._db.execute("INSERT OR REPLACE INTO migration_tasks VALUES (?, ?, ?)", (task_id, side, now + ttl))
        self._writes += 1
        if self._writes % 1000 == 0:  # expired sides go now and then, not on every write
            self._db.execute("DELETE FROM migration_tasks WHERE expires < ?", (now,))

    async def side_of_task(self, task_id: str) -> Side | None:
        row = self._db.execute("SELECT side FROM migration_tasks WHERE task_id = ? AND expires >= ?",
                               (task_id, time.time())).fetchone()
        return row[0] if row and row[0] in SIDES else None

    async def v2_gone(self) -> str | None:
        row = self._db.execute("SELECT value FROM migration_flags WHERE name = 'v2-gone'").fetchone()
        return row[0] if row else None

    async def set_v2_gone(self, why: str) -> bool:
        return self._db.execute("INSERT OR IGNORE INTO migration_flags VALUES ('v2-gone', ?)", (why,)).rowcount == 1

    async def clear_v2_gone(self) -> bool:
        return self._db.execute("DELETE FROM migration_flags WHERE name = 'v2-gone'").rowcount == 1

    async def add_event(self, event: dict) -> None:
        self._append("migration_events", event, EVENTS)

    async def events(self, limit: int = EVENTS) -> list[dict]:
        return self._last("migration_events", limit)

    async def add_comparison(self, doc: dict) -> None:
        self._append("migration_comparisons", doc, COMPARISONS)

    async def comparisons(self, limit: int = COMPARISONS) -> list[dict]:
        return self._last("migration_comparisons", limit)

    def _append(self, table: str, doc: dict, keep: int) -> None:
        self._db.execute(f"INSERT INTO {table} (doc) VALUES (?)", (orjson.dumps(doc),))
        self._db.execute(f"DELETE FROM {table} WHERE id <= (SELECT max(id) FROM {table}) - ?", (keep,))

    def _last(self, table: str, limit: int) -> list[dict]:
        return [orjson.loads(doc) for (doc,) in self._db.execute(f"SELECT doc FROM {table} ORDER BY id DESC LIMIT ?",
                                                                 (limit,))]

    async def close(self) -> None:
        self._db.close()


class RedisMigrationStore:
    def __init__(self, client: Redis, prefix: str) -> None:
        self._redis, self._p = client, f"{prefix}migration:"

    async def changes(self) -> dict[str, Rule]:
        return {fp.decode(): Rule.from_doc(orjson.loads(doc))
                for fp, doc in (await self._redis.hgetall(f"{self._p}changes")).items()}

    async def set_change(self, fingerprint: str, rule: Rule | None) -> None:
        if rule is None:
            await self._redis.hdel(f"{self._p}changes", fingerprint)
        else:
            await self._redis.hset(f"{self._p}changes", fingerprint, orjson.dumps(rule.to_doc()))

    async def remember_task(self, task_id: str, side: Side, ttl: float) -> None:
        await self._redis.set(f"{self._p}task:{task_id}", side, px=max(int(ttl * 1000), 1))

    async def side_of_task(self, task_id: str) -> Side | None:
        side = await self._redis.get(f"{self._p}task:{task_id}")
        return side.decode() if side and side.decode() in SIDES else None  # type: ignore[return-value]

    async def v2_gone(self) -> str | None:
        why = await self._redis.get(f"{self._p}v2-gone")
        return why.decode() if why is not None else None

    async def set_v2_gone(self, why: str) -> bool:
        return bool(await self._redis.set(f"{self._p}v2-gone", why, nx=True))

    async def clear_v2_gone(self) -> bool:
        return bool(await self._redis.delete(f"{self._p}v2-gone"))

    async def add_event(self, event: dict) -> None:
        await self._push("events", event, EVENTS)

    async def events(self, limit: int = EVENTS) -> list[dict]:
        return await self._last("events", limit)

    async def add_comparison(self, doc: dict) -> None:
        await self._push("comparisons", doc, COMPARISONS)

    async def comparisons(self, limit: int = COMPARISONS) -> list[dict]:
        return await self._last("comparisons", limit)

    async def _push(self, name: str, doc: dict, keep: int) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.lpush(f"{self._p}{name}", orjson.dumps(doc))
            pipe.ltrim(f"{self._p}{name}", 0, keep - 1)
            await pipe.execute()

    async def _last(self, name: str, limit: int) -> list[dict]:
        return [orjson.loads(doc) for doc in await self._redis.lrange(f"{self._p}{name}", 0, limit - 1)]

    async def close(self) -> None:
        return None
