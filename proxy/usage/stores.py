"""Where usage counts go: SQLite in the data directory (one process, or `--workers` on one
machine), or Redis when UPSCALE_PROXY_REDIS_URL is set (every replica adds to one view).

Both hold the same three things:
- counts per (client, hour, field) (proxy/usage/tally.py names the fields), added to by every
  flush; a bounded kind (user agents, body shapes) keeps at most its bound of distinct names per
  client and hour, the rest going to ua|other (shapes past it are not kept);
- one summary per client: when it was first seen, and its last V2 and /v3 calls;
- the operator's labels for clients.
Hours older than the retention are pruned (SQLite: `prune`; Redis: each hour's keys expire).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from proxy.stores.sqlite import open_database
from proxy.usage.tally import BOUNDS, OTHER, Key, Tally

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from proxy.settings import Settings
    from proxy.usage.view import Context


@dataclass(frozen=True, slots=True)
class ClientSeen:
    client: str
    first: float  # epoch seconds
    last_v2: float  # 0: never
    last_v3: float  # 0: never


@dataclass(frozen=True, slots=True)
class HourCounts:
    client: str
    hour: int
    counts: dict[str, int]


class UsageStore(Protocol):
    async def add(self, batch: dict[Key, Tally], retention: float) -> None:
        """Add a flush's counts; `retention`: seconds an hour is kept."""

    async def hours(self, since: int, until: int) -> list[HourCounts]:
        """Every client's counts for the hours in [since, until)."""

    async def clients(self) -> list[ClientSeen]: ...

    async def labels(self) -> dict[str, str]: ...

    async def set_label(self, client: str, label: str | None) -> None:
        """Name a client; None or "" removes its name."""

    async def prune(self, before: int) -> int:
        """Drop hours before `before`; -> how many (client, hour) rows went."""

    async def close(self) -> None: ...


def _kind(name: str) -> str:
    return name.split("|", 1)[0]


def _bounded(counts: dict[str, int], known: set[str], kind_counts: dict[str, int]) -> Iterable[tuple[str, int]]:
    """The fields to add, with the bounded kinds kept within their bound: `known` are the names of
    those kinds already stored for this client and hour, `kind_counts` how many of each kind."""
    for name, n in counts.items():
        kind = _kind(name)
        bound = BOUNDS.get(kind)
        if bound is None or name in known or name == f"{kind}|{OTHER}":
            yield name, n
        elif kind_counts.get(kind, 0) < bound:
            kind_counts[kind] = kind_counts.get(kind, 0) + 1
            known.add(name)
            yield name, n
        elif kind == "ua":
            yield f"ua|{OTHER}", n


_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage_counts (
    client TEXT NOT NULL, hour INTEGER NOT NULL, field TEXT NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (client, hour, field)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_counts_hour ON usage_counts (hour);
CREATE TABLE IF NOT EXISTS usage_clients (
    client TEXT PRIMARY KEY, first REAL NOT NULL, last_v2 REAL NOT NULL, last_v3 REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS usage_labels (client TEXT PRIMARY KEY, label TEXT NOT NULL);
"""


class SqliteUsageStore:
    """One SQLite file (WAL) that every process on the machine shares. Calls run in a thread, one
    at a time: a dashboard's read of a year of hours must not hold the event loop."""

    def __init__(self, path: Path) -> None:
        self._db = open_database(path, _SCHEMA)
        self._lock = asyncio.Lock()

    async def _run(self, fn, *args):
        async with self._lock:
            return await asyncio.to_thread(fn, *args)

    async def add(self, batch: dict[Key, Tally], retention: float) -> None:
        await self._run(self._add, batch)

    def _add(self, batch: dict[Key, Tally]) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for (client, hour), tally in batch.items():
                known: set[str] = set()
                kind_counts: dict[str, int] = {}
                for kind in BOUNDS:
                    names = [row[0] for row in db.execute(
                        "SELECT field FROM usage_counts WHERE client = ? AND hour = ? AND field > ? AND field < ?",
                        (client, hour, f"{kind}|", f"{kind}}}"))]
                    known.update(names)
                    kind_counts[kind] = sum(1 for name in names if name != f"{kind}|{OTHER}")
                db.executemany(
                    "INSERT INTO usage_counts (client, hour, field, n) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (client, hour, field) DO UPDATE SET n = n + excluded.n",
                    [(client, hour, name, n) for name, n in _bounded(tally.counts, known, kind_counts)])
                db.execute(
                    "INSERT INTO usage_clients (client, first, last_v2, last_v3) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (client) DO UPDATE SET first = min(first, excluded.first), "
                    "last_v2 = max(last_v2, excluded.last_v2), last_v3 = max(last_v3, excluded.last_v3)",
                    (client, tally.first, tally.last_v2, tally.last_v3))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def hours(self, since: int, until: int) -> list[HourCounts]:
        return await self._run(self._hours, since, until)

    def _hours(self, since: int, until: int) -> list[HourCounts]:
        rows: dict[tuple[str, int], dict[str, int]] = {}
        for client, hour, name, n in self._db.execute(
                "SELECT client, hour, field, n FROM usage_counts WHERE hour >= ? AND hour < ?", (since, until)):
            rows.setdefault((client, hour), {})[name] = n
        return [HourCounts(client, hour, counts) for (client, hour), counts in rows.items()]

    async def clients(self) -> list[ClientSeen]:
        return await self._run(lambda: [ClientSeen(*row) for row in self._db.execute(
            "SELECT client, first, last_v2, last_v3 FROM usage_clients")])

    async def labels(self) -> dict[str, str]:
        return await self._run(lambda: dict(self._db.execute("SELECT client, label FROM usage_labels")))

    async def set_label(self, client: str, label: str | None) -> None:
        if label:
            await self._run(self._db.execute, "INSERT INTO usage_labels (client, label) VALUES (?, ?) "
                            "ON CONFLICT (client) DO UPDATE SET label = excluded.label", (client, label))
        else:
            await self._run(self._db.execute, "DELETE FROM usage_labels WHERE client = ?", (client,))

    async def prune(self, before: int) -> int:
        return await self._run(self._prune, before)

    def _prune(self, before: int) -> int:
        gone = self._db.execute("SELECT COUNT(DISTINCT client || ' ' || hour) FROM usage_counts WHERE hour < ?",
                                (before,)).fetchone()[0]
        self._db.execute("DELETE FROM usage_counts WHERE hour < ?", (before,))
        self._db.execute("DELETE FROM usage_clients WHERE max(last_v2, last_v3) < ?", (before,))
        return gone

    async def close(self) -> None:
        async with self._lock:
            self._db.close()


# KEYS: the hour's hash, the hour's client set, the client's summary, the hours index
# ARGV: expire_at, hour, client, first, last_v2, last_v3, then field, n pairs
_ADD = """
local hash, bounds = KEYS[1], {ua = tonumber(ARGV[7]), body = tonumber(ARGV[8])}
for i = 9, #ARGV, 2 do
  local name, n = ARGV[i], tonumber(ARGV[i + 1])
  local kind = string.match(name, '^([^|]*)|')
  local bound = kind and bounds[kind]
  if not bound or name == kind .. '|other' or redis.call('HEXISTS', hash, name) == 1 then
    redis.call('HINCRBY', hash, name, n)
  elseif tonumber(redis.call('HGET', hash, '#' .. kind) or '0') < bound then
    redis.call('HINCRBY', hash, '#' .. kind, 1)
    redis.call('HINCRBY', hash, name, n)
  elseif kind == 'ua' then
    redis.call('HINCRBY', hash, 'ua|other', n)
  end
end
redis.call('EXPIREAT', hash, ARGV[1])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('EXPIREAT', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[2])
local first = tonumber(redis.call('HGET', KEYS[3], 'first') or ARGV[4])
redis.call('HSET', KEYS[3], 'first', tostring(math.min(first, tonumber(ARGV[4]))))
for _, f in ipairs({{'last_v2', 5}, {'last_v3', 6}}) do
  local was = tonumber(redis.call('HGET', KEYS[3], f[1]) or '0')
  if tonumber(ARGV[f[2]]) > was then redis.call('HSET', KEYS[3], f[1], ARGV[f[2]]) end
end
redis.call('EXPIREAT', KEYS[3], ARGV[1])
"""


class RedisUsageStore:
    """Under the proxy's Redis key prefix:

        <prefix>usage:h:<hour>:<client>   hash: field -> count (and #ua, #body: distinct names kept)
        <prefix>usage:c:<hour>            set: the clients seen in the hour
        <prefix>usage:hours               sorted set: the hours with counts
        <prefix>usage:client:<client>     hash: first, last_v2, last_v3
        <prefix>usage:labels              hash: client -> label

    Every key but the labels expires with the retention; each flush is one script per client and
    hour, so replicas adding to the same hour never lose a count."""

    def __init__(self, client: Redis, prefix: str) -> None:
        self._redis, self._p = client, f"{prefix}usage:"
        self._add = client.register_script(_ADD)

    async def add(self, batch: dict[Key, Tally], retention: float) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for (client, hour), tally in batch.items():
                args: list[str | int | float] = [int(hour + retention), hour, client, repr(tally.first),
                                                 repr(tally.last_v2), repr(tally.last_v3),
                                                 BOUNDS["ua"], BOUNDS["body"]]
                for name, n in tally.counts.items():
                    args += [name, n]
                await self._add(keys=[f"{self._p}h:{hour}:{client}", f"{self._p}c:{hour}",
                                      f"{self._p}client:{client}", f"{self._p}hours"], args=args, client=pipe)
            await pipe.execute()

    async def hours(self, since: int, until: int) -> list[HourCounts]:
        hours = [int(h) for h in await self._redis.zrangebyscore(f"{self._p}hours", since, f"({until}")]
        async with self._redis.pipeline(transaction=False) as pipe:
            for hour in hours:
                pipe.smembers(f"{self._p}c:{hour}")
            members = await pipe.execute()
        keys = [(client.decode(), hour) for hour, clients in zip(hours, members, strict=True) for client in clients]
        async with self._redis.pipeline(transaction=False) as pipe:
            for client, hour in keys:
                pipe.hgetall(f"{self._p}h:{hour}:{client}")
            hashes = await pipe.execute()
        return [HourCounts(client, hour, {k.decode(): int(v) for k, v in doc.items() if not k.startswith(b"#")})
                for (client, hour), doc in zip(keys, hashes, strict=True) if doc]

    async def clients(self) -> list[ClientSeen]:
        keys = [key async for key in self._redis.scan_iter(f"{self._p}client:*", count=1000)]
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(key)
            docs = await pipe.execute()
        start = len(f"{self._p}client:")
        return [ClientSeen(key.decode()[start:], float(doc[b"first"]), float(doc.get(b"last_v2", 0)),
                           float(doc.get(b"last_v3", 0))) for key, doc in zip(keys, docs, strict=True) if doc]

    async def labels(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in (await self._redis.hgetall(f"{self._p}labels")).items()}

    async def set_label(self, client: str, label: str | None) -> None:
        if label:
            await self._redis.hset(f"{self._p}labels", client, label)
        else:
            await self._redis.hdel(f"{self._p}labels", client)

    async def prune(self, before: int) -> int:
        """The hours' keys expire by themselves; only the index is trimmed here."""
        return int(await self._redis.zremrangebyscore(f"{self._p}hours", "-inf", f"({before}"))

    async def close(self) -> None:
        return None


@contextlib.asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[tuple[UsageStore, Context]]:
    """The usage store the settings name, for a reader outside the server (`audit --store`), with
    the context its views need."""
    from proxy.usage.service import context_of

    if settings.redis_url is None:
        store = SqliteUsageStore(settings.data_dir / "usage.sqlite3")
        try:
            yield store, context_of(settings, time.time())
        finally:
            await store.close()
        return
    from proxy.stores.redis import connect

    async with connect(settings.redis_url.get_secret_value(), settings.redis_timeout) as client:
        yield RedisUsageStore(client, settings.redis_prefix), context_of(settings, time.time())
