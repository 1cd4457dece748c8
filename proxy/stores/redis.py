"""The stores for replicas on many machines: Redis holds the tasks, their leases, the queue of due
tasks and the blobs (with native TTLs), under one key prefix.

    <prefix>task:<id>   the task record, as JSON (the task's own document inside)
    <prefix>leases      hash: task id -> "<until> <owner>", while a process holds the task
    <prefix>due         sorted set: running task ids by due_at (its size: how many are running)
    <prefix>wakes       hash: task id -> the time a wake asked for, while a lease holder moves it
    <prefix>purge       sorted set: every task id by purge_at
    <prefix>blob:<name> the bytes of an input or a composed image, with a TTL when given one
    <prefix>shared:<k>  RedisSharedResults: results every replica reads (webhook deliveries and
                        finished direct results), each with a TTL

Each change to a task and its lease is one Lua script, so two replicas never both change a task.
Times are passed in, as in every store; floats go to Redis as their repr and are compared there.

A lost connection (Redis down, restarting, too slow) raises StoreUnavailable (code 5, "retry")
from every method of the stores: a submission that meets it tells its client so, a poll answers
its task's last known state, and the next call reconnects. RedisSharedResults is different: it
only saves V3 calls, so it never raises; a Redis error makes it answer "nothing there" (and store
nothing) for a few seconds.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Concatenate, ParamSpec, TypeVar

import orjson
import structlog
from redis import exceptions
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from proxy.errors import StoreUnavailable
from proxy.stores.base import TaskRecord

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")

UNAVAILABLE = "the task store is unavailable, retry"
log = structlog.get_logger("proxy")


def connect(url: str, timeout: float) -> Redis:
    """A client (a connection pool, connected on first use) for `redis://` or `rediss://` URLs.

    One immediate retry on a connection error mends a pooled connection that a restart of Redis
    broke; an outage then fails fast instead of holding polls in back-offs."""
    return Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                          retry=Retry(NoBackoff(), 1, supported_errors=(exceptions.ConnectionError,)))


def _unavailable(method: Callable[Concatenate[S, P], Awaitable[R]]) -> Callable[Concatenate[S, P], Awaitable[R]]:
    @functools.wraps(method)
    async def mapped(self: S, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(self, *args, **kwargs)
        except (exceptions.ConnectionError, exceptions.TimeoutError) as e:
            raise StoreUnavailable(UNAVAILABLE) from e

    return mapped


# KEYS: task, due, purge; ARGV: id, doc, running (1/0), due_at, purge_at, max running ('': none)
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.error_reply('task ' .. ARGV[1] .. ' exists') end
if ARGV[3] == '1' and ARGV[6] ~= '' and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[6]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
if ARGV[3] == '1' then redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1]) end
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
return 1
"""

# KEYS: task, leases, wakes; ARGV: id, owner, now, until. The step to come sees what woke the task.
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local lease = redis.call('HGET', KEYS[2], ARGV[1])
if lease and tonumber(string.match(lease, '^%S+')) >= tonumber(ARGV[3])
   and string.match(lease, '^%S+ (.*)$') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4] .. ' ' .. ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""

# KEYS: task, leases, due, purge, wakes; ARGV: id, owner, doc, running (1/0), due_at, purge_at
_SAVE = """
local lease = redis.call('HGET', KEYS[2], ARGV[1])
if not lease or string.match(lease, '^%S+ (.*)$') ~= ARGV[2] then return 0 end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('SET', KEYS[1], ARGV[3])
redis.call('HDEL', KEYS[2], ARGV[1])
local due_at, woken = ARGV[5], redis.call('HGET', KEYS[5], ARGV[1])
if woken then
  redis.call('HDEL', KEYS[5], ARGV[1])
  if tonumber(woken) < tonumber(due_at) then due_at = woken end
end
if ARGV[4] == '1' then redis.call('ZADD', KEYS[3], due_at, ARGV[1]) else redis.call('ZREM', KEYS[3], ARGV[1]) end
redis.call('ZADD', KEYS[4], ARGV[6], ARGV[1])
return 1
"""

# KEYS: leases; ARGV: id, owner
_RELEASE = """
local lease = redis.call('HGET', KEYS[1], ARGV[1])
if lease and string.match(lease, '^%S+ (.*)$') == ARGV[2] then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 1
"""

# KEYS: due, leases, wakes; ARGV: id, at. Only running tasks are in `due`.
_WAKE = """
local due_at = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not due_at then return 0 end
if tonumber(due_at) > tonumber(ARGV[2]) then redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1]) end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  local woken = redis.call('HGET', KEYS[3], ARGV[1])
  if not woken or tonumber(woken) > tonumber(ARGV[2]) then redis.call('HSET', KEYS[3], ARGV[1], ARGV[2]) end
end
return 1
"""

# KEYS: due, leases; ARGV: now, limit. Leased tasks are skipped, a bounded number of them per call.
_DUE = """
local now, limit, out, offset, chunk = tonumber(ARGV[1]), tonumber(ARGV[2]), {}, 0, 256
while #out < limit and offset < 100000 do
  local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', offset, chunk)
  for _, id in ipairs(ids) do
    local lease = redis.call('HGET', KEYS[2], id)
    if not lease or tonumber(string.match(lease, '^%S+')) < now then
      out[#out + 1] = id
      if #out >= limit then break end
    end
  end
  if #ids < chunk then break end
  offset = offset + chunk
end
return out
"""


class RedisTaskStore:
    """Composed tasks in Redis, shared by every replica that has the same URL and prefix."""

    def __init__(self, client: Redis, prefix: str) -> None:
        self._redis, self._prefix = client, prefix
        self._leases, self._due, self._purge = f"{prefix}leases", f"{prefix}due", f"{prefix}purge"
        self._wakes = f"{prefix}wakes"
        self._create = client.register_script(_CREATE)
        self._acquire = client.register_script(_ACQUIRE)
        self._save = client.register_script(_SAVE)
        self._release = client.register_script(_RELEASE)
        self._wake = client.register_script(_WAKE)
        self._due_ids = client.register_script(_DUE)

    def _key(self, task_id: str) -> str:
        return f"{self._prefix}task:{task_id}"

    @_unavailable
    async def create(self, task: TaskRecord, max_running: int | None = None) -> bool:
        return bool(await self._create(
            keys=[self._key(task.task_id), self._due, self._purge],
            args=[task.task_id, _document(task), _running(task), repr(task.due_at), repr(task.purge_at),
                  "" if max_running is None else max_running]))

    @_unavailable
    async def get(self, task_id: str) -> TaskRecord | None:
        stored = await self._redis.get(self._key(task_id))
        if stored is None:
            return None
        doc = orjson.loads(stored)
        return TaskRecord(task_id, doc["doc"], doc["running"], doc["due_at"], doc["purge_at"])

    @_unavailable
    async def acquire(self, task_id: str, owner: str, now: float, seconds: float) -> bool:
        return bool(await self._acquire(keys=[self._key(task_id), self._leases, self._wakes],
                                        args=[task_id, owner, repr(now), repr(now + seconds)]))

    @_unavailable
    async def save(self, task: TaskRecord, owner: str) -> bool:
        return bool(await self._save(
            keys=[self._key(task.task_id), self._leases, self._due, self._purge, self._wakes],
            args=[task.task_id, owner, _document(task), _running(task), repr(task.due_at),
                  repr(task.purge_at)],
        ))

    @_unavailable
    async def release(self, task_id: str, owner: str) -> None:
        await self._release(keys=[self._leases], args=[task_id, owner])

    @_unavailable
    async def wake(self, task_id: str, at: float) -> None:
        await self._wake(keys=[self._due, self._leases, self._wakes], args=[task_id, repr(at)])

    @_unavailable
    async def due(self, now: float, limit: int) -> list[str]:
        ids = await self._due_ids(keys=[self._due, self._leases], args=[repr(now), limit])
        return [i.decode() for i in ids]

    @_unavailable
    async def purgeable(self, now: float) -> list[str]:
        return [i.decode() for i in await self._redis.zrangebyscore(self._purge, "-inf", f"({now!r}")]

    @_unavailable
    async def delete(self, task_id: str) -> None:
        async with self._redis.pipeline(transaction=True) as tx:
            tx.delete(self._key(task_id)).hdel(self._leases, task_id).hdel(self._wakes, task_id)
            tx.zrem(self._due, task_id).zrem(self._purge, task_id)
            await tx.execute()

    async def reachable(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (exceptions.RedisError, OSError):
            return False

    async def close(self) -> None:
        """Nothing: the client is shared with the result store, and closed by whoever made it."""


class RedisResultStore:
    """Blobs in Redis; one given a TTL (a composed image, for its `img_expire_ttl`) expires by itself."""

    def __init__(self, client: Redis, prefix: str) -> None:
        self._redis, self._prefix = client, prefix

    def _key(self, name: str) -> str:
        return f"{self._prefix}blob:{name}"

    @_unavailable
    async def put(self, name: str, data: bytes, ttl: float | None = None) -> None:
        await self._redis.set(self._key(name), data, px=max(int(ttl * 1000), 1) if ttl is not None else None)

    @_unavailable
    async def get(self, name: str) -> bytes | None:
        return await self._redis.get(self._key(name))

    @_unavailable
    async def delete(self, name: str) -> None:
        await self._redis.delete(self._key(name))


def _running(task: TaskRecord) -> str:
    return "1" if task.running else "0"


def _document(task: TaskRecord) -> bytes:
    """What `<prefix>task:<id>` holds: the owner's document and the record's index fields."""
    return orjson.dumps({"doc": task.doc, "running": task.running, "due_at": task.due_at,
                         "purge_at": task.purge_at})


class RedisSharedResults:
    """Small values every replica on this Redis reads: V3 results that a webhook delivered to one
    replica, and finished direct results, so that another replica's poll or task step finds them
    without a V3 call. Each value expires by itself (SET with PX).

    Best effort: a Redis error never reaches the caller. `get`/`pop` answer None, `put` answers
    False, the first error in a row is logged at warning (the rest at debug), and for `pause`
    seconds after an error Redis is not tried at all, so that polls go on to V3 without waiting
    for Redis again and again."""

    def __init__(self, client: Redis, prefix: str, *, pause: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._redis, self._prefix = client, f"{prefix}shared:"
        self._pause, self._clock = pause, clock
        self._paused_until = 0.0
        self._failing = False

    def _key(self, key: str) -> str:
        return self._prefix + key

    async def put(self, key: str, value: bytes, ttl_s: float) -> bool:
        """Keep `value` for `ttl_s` seconds. -> whether it was stored."""
        if ttl_s <= 0 or not self._usable():
            return False
        try:
            await self._redis.set(self._key(key), value, px=max(int(ttl_s * 1000), 1))
        except (exceptions.RedisError, OSError) as e:
            return self._failed("put", e, False)
        return self._worked(True)

    async def get(self, key: str) -> bytes | None:
        found = await self.get_with_ttl(key)
        return found[0] if found else None

    async def get_with_ttl(self, key: str) -> tuple[bytes, float] | None:
        """The value and the seconds it has left, in one round trip; None: not there (or Redis failed)."""
        if not self._usable():
            return None
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                value, ttl_ms = await pipe.get(self._key(key)).pttl(self._key(key)).execute()
        except (exceptions.RedisError, OSError) as e:
            return self._failed("get", e, None)
        if value is None or ttl_ms == -2:  # gone between the two commands
            return self._worked(None)
        return self._worked((value, ttl_ms / 1000 if ttl_ms >= 0 else float("inf")))

    async def pop(self, key: str) -> bytes | None:
        """The value, removed (GET and DEL in one transaction: Redis before 6.2 has no GETDEL)."""
        if not self._usable():
            return None
        try:
            async with self._redis.pipeline(transaction=True) as tx:
                value, _ = await tx.get(self._key(key)).delete(self._key(key)).execute()
        except (exceptions.RedisError, OSError) as e:
            return self._failed("pop", e, None)
        return self._worked(value)

    def _usable(self) -> bool:
        return self._clock() >= self._paused_until

    def _failed(self, what: str, error: Exception, answer):
        self._paused_until = self._clock() + self._pause
        (log.debug if self._failing else log.warning)(
            "Redis is unavailable for shared results: V3 is asked instead", op=what,
            error=f"{type(error).__name__}: {error}", pause_s=self._pause)
        self._failing = True
        return answer

    def _worked(self, answer):
        if self._failing:
            log.info("Redis is back for shared results")
            self._failing = False
        return answer
