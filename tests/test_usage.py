"""The usage store (issue 16): the hot path's tallies, one contract suite over both stores (SQLite;
Redis on a real server), each client's readiness on an injected clock, and real calls through
real proxies (one, then two replicas on one Redis) read back from the store."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from proxy.keys import USAGE
from proxy.stores.redis import connect
from proxy.usage import view
from proxy.usage.readiness import readiness
from proxy.usage.stores import RedisUsageStore, SqliteUsageStore, UsageStore
from proxy.usage.tally import HOUR, SHAPES_TOP, UA_TOP, Tallies
from proxy.usage.view import Context, Filters
from tests.helpers import upscale, v2_call
from tests.images import b64

SECRET = "usage tests"
DAY = 86400
NOW = 1_800_000_000.0  # 2027-01-15, a Friday
KEY, OTHER_KEY = "sk-usage-client-a", "sk-usage-client-b"
DIRECT = {"upscaler_1": "R-ESRGAN 4x+", "upscaling_resize": 2}
CROP = {"upscaler_1": "R-ESRGAN 4x+", "resize_mode": 1, "upscaling_resize_w": 30, "upscaling_resize_h": 20,
        "upscaling_crop": True}


def fp(key: str) -> str:
    return hmac.new(SECRET.encode(), key.encode(), hashlib.sha256).hexdigest()[:16]


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- the tallies: what the hot path adds to -------------------------------------------------------

def test__tallies__count_per_client_and_hour_and_hand_over_what_they_hold():
    clock = Clock()
    tallies = Tallies(clock)
    tallies.v2_call("a", "upscale", 0, "sdk/1", {"crop": "emulate"}, jobs=2, shape='{"s":1}')
    tallies.v2_call("a", "progress", 0, "sdk/1")
    tallies.v2_call(None, "upscale", 4, "curl/8")
    clock.now += HOUR
    tallies.v3_call("a", "POST", 200)
    batch = tallies.take()
    hour = int(NOW // HOUR) * HOUR
    assert set(batch) == {("a", hour), ("unidentified", hour), ("a", hour + HOUR)}
    first = batch["a", hour]
    assert dict(first.counts) == {"v2|upscale|0": 1, "v2|progress|0": 1, "ua|sdk/1": 2, "feature|crop|emulate": 1,
                                  "jobs": 2, 'body|{"s":1}': 1}
    assert (first.first, first.last_v2, first.last_v3) == (NOW, NOW, 0)
    assert batch["a", hour + HOUR].last_v3 == NOW + HOUR
    assert len(tallies) == 0 and tallies.take() == {}


def test__tallies__a_batch_put_back_goes_out_with_the_next():
    tallies = Tallies(Clock())
    tallies.v2_call("a", "upscale", 0, "sdk/1")
    batch = tallies.take()
    tallies.v2_call("a", "upscale", 0, "sdk/1")
    tallies.put_back(batch)
    (merged,) = tallies.take().values()
    assert merged.counts["v2|upscale|0"] == 2


# --- the stores' contract ---------------------------------------------------------------------------

@pytest.fixture(params=["sqlite", "redis"])
async def store(request, tmp_path) -> AsyncIterator[UsageStore]:
    if request.param == "sqlite":
        store = SqliteUsageStore(tmp_path / "usage.sqlite3")
        yield store
        await store.close()
        return
    server = request.getfixturevalue("redis_server")
    async with connect(server.url, timeout=5) as client:
        yield RedisUsageStore(client, f"test-{uuid.uuid4().hex}:")


async def add(store: UsageStore, clock: Clock, calls: list[tuple]) -> None:
    tallies = Tallies(clock)
    for client, *call in calls:
        if call[0] == "v3":
            tallies.v3_call(client, "POST", 200)
        else:
            tallies.v2_call(client, *call)
    await store.add(tallies.take(), retention=400 * DAY)


async def test__store__adds_batches_up_per_client_and_hour(store):
    clock = Clock()
    await add(store, clock, [("a", "upscale", 0, "sdk/1"), ("b", "upscale", 6, "sdk/2")])
    await add(store, clock, [("a", "upscale", 0, "sdk/1", {"crop": "emulate"}, 1)])
    clock.now += 2 * HOUR
    await add(store, clock, [("a", "v3")])
    hour = int(NOW // HOUR) * HOUR
    rows = {(r.client, r.hour): r.counts for r in await store.hours(hour, hour + 3 * HOUR)}
    assert rows == {
        ("a", hour): {"v2|upscale|0": 2, "ua|sdk/1": 2, "feature|crop|emulate": 1, "jobs": 1},
        ("b", hour): {"v2|upscale|6": 1, "ua|sdk/2": 1},
        ("a", hour + 2 * HOUR): {"v3|POST|200": 1},
    }
    assert [r.client for r in await store.hours(hour + HOUR, hour + 2 * HOUR)] == []
    seen = {c.client: c for c in await store.clients()}
    assert (seen["a"].first, seen["a"].last_v2, seen["a"].last_v3) == (NOW, NOW, NOW + 2 * HOUR)
    assert (seen["b"].last_v2, seen["b"].last_v3) == (NOW, 0)


async def test__store__keeps_the_first_user_agents_and_shapes_of_an_hour_the_rest_as_other(store):
    clock = Clock()
    for batch in range(3):  # the bound holds across flushes, not just within one
        await add(store, clock, [("a", "upscale", 0, f"ua-{batch}-{i}", None, 0, f"shape-{batch}-{i}")
                                 for i in range(6)])
    (row,) = await store.hours(0, int(NOW) + HOUR)
    uas = {k: n for k, n in row.counts.items() if k.startswith("ua|")}
    assert len(uas) == UA_TOP + 1 and uas["ua|other"] == 18 - UA_TOP
    assert sum(1 for k in row.counts if k.startswith("body|")) == SHAPES_TOP
    assert row.counts["v2|upscale|0"] == 18


async def test__store__labels_a_client_and_forgets_the_label(store):
    await store.set_label("a", "billing team")
    assert await store.labels() == {"a": "billing team"}
    await store.set_label("a", None)
    assert await store.labels() == {}


async def test__store__prunes_hours_past_the_retention(store):
    clock = Clock()
    await add(store, clock, [("a", "upscale", 0, "sdk/1")])
    clock.now += 10 * DAY
    await add(store, clock, [("a", "upscale", 0, "sdk/1")])
    await store.prune(int(NOW + DAY))
    assert [r.hour for r in await store.hours(0, int(clock.now) + HOUR)] == [int(clock.now // HOUR) * HOUR]


# --- readiness, on an injected clock --------------------------------------------------------------

SUNSET = datetime.fromtimestamp(NOW, UTC) + timedelta(days=45)


@pytest.mark.parametrize(("last_v2", "last_v3", "features", "expected"), [
    (NOW - 31 * DAY, NOW - DAY, [], ("migrated", "done")),
    (NOW - 31 * DAY, NOW - 31 * DAY, [], ("quiet", "done")),
    (NOW - 31 * DAY, 0, ["face"], ("quiet", "done")),
    (NOW - DAY, NOW - DAY, ["crop"], ("blocked", "on track")),
    (NOW - DAY, 0, [], ("ready", "on track")),
    (NOW - 29 * DAY, 0, ["face", "orientation"], ("blocked", "on track")),  # orientation: a change, not a block
])
def test__readiness__follows_the_rules(last_v2, last_v3, features, expected):
    verdict = readiness(last_v2=last_v2, last_v3=last_v3, features=features, now=NOW, window_days=30,
                        sunset=SUNSET)
    assert (verdict.readiness, verdict.deadline) == expected
    assert verdict.blocking == (tuple(f for f in features if f != "orientation") if expected[0] == "blocked" else ())


@pytest.mark.parametrize(("days_to_sunset", "deadline"), [(45, "on track"), (29, "due soon"), (0, "due soon"),
                                                            (-1, "overdue"), (None, "no sunset")])
def test__readiness__the_deadline_is_the_sunset(days_to_sunset, deadline):
    sunset = None if days_to_sunset is None else datetime.fromtimestamp(NOW + days_to_sunset * DAY + 60, UTC)
    verdict = readiness(last_v2=NOW, last_v3=0, features=[], now=NOW, window_days=30, sunset=sunset)
    assert verdict.deadline == deadline and verdict.days_left == days_to_sunset


async def test__views__read_the_rules_from_the_store_as_the_clock_moves(tmp_path):
    clock = Clock(NOW - 40 * DAY)
    store = SqliteUsageStore(tmp_path / "usage.sqlite3")
    await add(store, clock, [("moving", "upscale", 0, "sdk/1", {"crop": "emulate"}), ("stays", "upscale", 0, "x")])
    clock.now = NOW - DAY
    await add(store, clock, [("moving", "v3"), ("stays", "upscale", 0, "x", {"crop": "emulate"})])
    ctx = Context(NOW, 30, SUNSET, labels={"stays": "the old plugin"})
    table = await view.clients(store, ctx, Filters(days=90))
    rows = {row["client"]: row for row in table["clients"]}
    assert (rows["moving"]["readiness"], rows["stays"]["readiness"]) == ("migrated", "blocked")
    assert rows["stays"]["label"] == "the old plugin" and rows["stays"]["blocking"] == ["crop"]
    assert rows["moving"]["v3_share"] == 0.5 and table["totals"]["by_readiness"]["migrated"] == 1
    only = await view.clients(store, ctx, Filters.from_query({"days": "90", "q": "PLUGIN"}))
    assert [row["client"] for row in only["clients"]] == ["stays"]
    recent = await view.clients(store, ctx, Filters(days=7))  # the period shows only its own calls
    assert {r["client"]: r["v2_calls"] for r in recent["clients"]} == {"moving": 0, "stays": 1}
    await store.close()


# --- real calls through real proxies ----------------------------------------------------------------

async def flushed(client) -> None:
    await client.server.app[USAGE].flush()


async def test__calls_through_the_proxy__reach_the_store_with_features_jobs_and_agents(emulator, start_proxy):
    proxy = await start_proxy(str(emulator[0].make_url("")), fingerprint_secret=SECRET, policy_crop="strict")
    assert (await upscale(proxy, {"image": b64(), **DIRECT}, headers=auth(KEY, "sdk/1")))["code"] == 0
    refused = await upscale(proxy, {"image": b64(), **CROP}, headers=auth(KEY, "sdk/1"))
    assert refused["code"] == 10
    await v2_call(proxy, "GET", "/v2/progress?task_id=nope", headers=auth(OTHER_KEY, "script"))
    async with proxy.get("/v3/async/task-result?task_id=x", headers=auth(OTHER_KEY, "script")) as resp:
        assert resp.status == 404
    await flushed(proxy)
    ctx = proxy.server.app[USAGE].context()
    rows = {r["client"]: r for r in (await view.clients(proxy.server.app[USAGE].store, ctx, Filters()))["clients"]}
    a, b = rows[fp(KEY)], rows[fp(OTHER_KEY)]
    assert a["endpoints"] == {"upscale": 2} and a["v2_codes"] == {"0": 1, "10": 1} and a["v3_jobs"] == 1
    # R-ESRGAN 4x+ is V3's nearest model (a change); the crop was refused (V3 lacks it)
    assert a["features"] == {"crop": {"refused": 1}, "model": {"approximate": 1}} and a["user_agents"] == {"sdk/1": 2}
    assert a["readiness"] == "blocked" and a["blocking"] == ["crop"]
    assert b["v2_codes"] == {"3": 1} and b["v3_calls"] == 1 and b["v3_share"] == 0.5
    assert KEY not in str(rows) and OTHER_KEY not in str(rows)


def auth(key: str, agent: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "User-Agent": agent}


async def test__two_replicas_on_one_redis__add_to_one_view_each_call_once(redis_server, emulator, start_proxy):
    prefix = f"test-{uuid.uuid4().hex}:"
    replicas = [await start_proxy(str(emulator[0].make_url("")), fingerprint_secret=SECRET, redis_url=redis_server.url,
                                  redis_prefix=prefix) for _ in range(2)]
    for i, replica in enumerate(replicas * 3):
        key = (KEY, OTHER_KEY)[i % 2]
        assert (await upscale(replica, {"image": b64(), **DIRECT}, headers=auth(key, "sdk/1")))["code"] == 0
    await asyncio.gather(*(flushed(r) for r in replicas))
    for replica in replicas:  # either replica's view is the same: every call, once
        app = replica.server.app
        rows = (await view.clients(app[USAGE].store, app[USAGE].context(), Filters()))["clients"]
        assert {r["client"]: r["v2_calls"] for r in rows} == {fp(KEY): 3, fp(OTHER_KEY): 3}


async def test__audit_store__prints_the_report_from_what_the_proxy_stored(emulator, start_proxy, tmp_path):
    proxy = await start_proxy(str(emulator[0].make_url("")), fingerprint_secret=SECRET)
    for body in (DIRECT, CROP):
        assert (await upscale(proxy, {"image": b64(), **body}, headers=auth(KEY, "sdk/1")))["code"] == 0
    await flushed(proxy)
    env = {**os.environ, "UPSCALE_PROXY_DATA_DIR": str(tmp_path / "data")}
    env.pop("UPSCALE_PROXY_REDIS_URL", None)
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "proxy", "audit", "--store", "--json"],
                                   capture_output=True, text=True, env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    (row,) = orjson.loads(done.stdout)
    assert row["fingerprint"] == fp(KEY) and row["calls"] == 2 and row["user_agents"] == {"sdk/1": 2}
    assert row["fields"]["upscaling_crop"] == 1 and row["fields"]["upscaler_1"] == 2
    assert {"scale_to", "crop", "model"} <= set(row["features"])
    assert row["verdict"].startswith("depends on features V3 lacks: scale_to, crop")
    text = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "proxy", "audit", "--store"],
                                   capture_output=True, text=True, env=env, timeout=60, check=False)
    assert f"client {fp(KEY)}: 2 calls" in text.stdout and "verdict:     depends on features V3 lacks" in text.stdout


def test__burn_down__is_the_line_through_the_days_carried_to_the_sunset():
    days = [int(NOW // DAY) * DAY + i * DAY for i in range(5)]
    sunset = datetime.fromtimestamp(days[3], UTC)
    line = view.burn_down(days, [50, 40, 30, 20, 10], sunset)
    assert line["zero_day"] == view.iso(days[4] + DAY) and line["at_sunset"] == 20
    assert line["days"][0] == days[0] and line["projected"][:5] == [50, 40, 30, 20, 10]
    assert view.burn_down(days, [0] * 5, sunset)["zero_day"] is None  # nothing to burn down


async def test__overview__fits_the_burn_down_on_whole_days_only(tmp_path):
    clock = Clock(NOW - 3 * DAY)
    store = SqliteUsageStore(tmp_path / "usage.sqlite3")
    for calls in (30, 20, 10):  # three whole days going down by 10, then a day just begun
        await add(store, clock, [("a", "upscale", 0, "x")] * calls)
        clock.now += DAY
    await add(store, clock, [("a", "upscale", 0, "x")])
    overview = await view.overview(store, Context(clock.now, 30, None), Filters(days=7))
    assert overview["daily"]["v2"][-4:] == [30, 20, 10, 1]
    assert overview["burn_down"]["zero_day"] == view.iso(view.day_of(clock.now))  # 30, 20, 10: zero today
    await store.close()
