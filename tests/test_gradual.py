"""Gradual migration (issue 17), through HTTP: real proxies in front of both emulators, the V3 one
and the legacy V2 one (each written from the spec alone), on loopback; two replicas on one Redis
where it matters. Each stage is served by its side, a task is polled where it was taken, a forced
route works only where allowed, V2's removal moves everyone to the translation, shadow comparisons
tell a real difference from an explained one within their budget, a failing canary steps back, and
a legacy SDK sees none of it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import uuid
from pathlib import Path

import pytest
from novita_client import NovitaClient, UpscaleRequest
from novita_client.proto import UpscaleResizeMode

from proxy.keys import MIGRATION, MIGRATION_STORE, RESULTS, ROUTER, USAGE
from proxy.migration.stages import MigrationFileError, Rule, Rules, bucket
from proxy.settings import Settings
from tests.helpers import poll_until_done, upscale, v2_call
from tests.images import decode, encode, pattern

SECRET = "gradual tests"
ADMIN = "an-admin-token-for-the-gradual-tests"
KEYS = {name: f"sk-gradual-{name}" for name in ("legacy", "shadow", "canary", "translated", "forcing", "other")}
DIRECT = {"upscaler_1": "R-ESRGAN 4x+ Anime6B", "upscaling_resize": 2}  # V3 has the same weights: exact
# 30 x 22 from 12 x 9 with crop: under v1.6 the target is rounded down to a multiple of 8, under v1.3 not
EXACT_CROP = {"upscaler_1": "4x-UltraSharp", "resize_mode": 1, "upscaling_resize_w": 30, "upscaling_resize_h": 22,
              "upscaling_crop": True}


def fp(key: str) -> str:
    return hmac.new(SECRET.encode(), key.encode(), hashlib.sha256).hexdigest()[:16]


def headers(name: str, **more: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}", "User-Agent": f"gradual-{name}", **more}


def body(fields: dict, w: int = 12, h: int = 9) -> dict:
    return {"image": base64.b64encode(encode(pattern(w, h))).decode(), **fields}


def migration_file(tmp_path: Path, default: str = "legacy", canary_hash: str = "client", **stages) -> Path:
    lines = [f'default = "{default}"', f'canary_hash = "{canary_hash}"']
    for name, (stage, percent, allow) in stages.items():
        lines += ["[[clients]]", f'fingerprint = "{fp(KEYS[name])}"', f'stage = "{stage}"', f"percent = {percent}",
                  f"allow_route = {str(allow).lower()}"]
    path = tmp_path / "migration.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def start_migrating(emulator, legacy, start_proxy, tmp_path):
    async def start(file: Path | None = None, **settings):
        v3, _ = emulator
        v2, _ = legacy
        return await start_proxy(str(v3.make_url("")), v2_upstream=str(v2.make_url("")), migration_file=file,
                                 fingerprint_secret=SECRET,
                                 image_hosts=[f"127.0.0.1:{v3.port}", f"127.0.0.1:{v2.port}"], **settings)
    return start


async def submit(proxy, name: str, fields: dict = DIRECT, **more: str) -> tuple[str, str]:
    """-> (the task id, the side that served the submission)"""
    async with proxy.post("/v2/upscale", json=body(fields), headers=headers(name, **more)) as resp:
        doc = await resp.json()
        assert resp.status == 200 and doc["code"] == 0, doc
        return doc["data"]["task_id"], resp.headers["X-Upscale-Proxy-Served-By"]


async def finish(proxy, name: str, task_id: str) -> tuple[dict, str]:
    """Poll until done: (the data, the side that served the last poll); the image downloads."""
    data = await poll_until_done(proxy, task_id, headers=headers(name))
    async with proxy.get(f"/v2/progress?task_id={task_id}", headers=headers(name)) as resp:
        side = resp.headers["X-Upscale-Proxy-Served-By"]
    assert data["status"] == 2, data
    async with proxy.session.get(data["imgs"][0]) as resp:
        assert resp.status == 200
        decode(await resp.read())
    return data, side


# --- each stage, served by its side -------------------------------------------------------------------

async def test__each_stage__is_served_by_its_side_and_each_task_polled_where_it_was_taken(
        start_migrating, emulator, legacy, tmp_path):
    file = migration_file(tmp_path, legacy=("legacy", 0, False), shadow=("shadow", 0, False),
                          canary=("canary", 100, False), translated=("translated", 0, False))
    proxy = await start_migrating(file, shadow_max_per_minute=0)  # shadows are tested below
    v2, v3 = legacy[1], emulator[1]
    sides = {}
    for name in ("legacy", "shadow", "canary", "translated"):
        task_id, served = await submit(proxy, name)
        sides[name] = served
        assert (await finish(proxy, name, task_id))[1] == served
    assert sides == {"legacy": "legacy", "shadow": "legacy", "canary": "v3", "translated": "v3"}
    assert v2.requests["upscale"] == 2 and v3.requests["submit"] == 2
    assert (await submit(proxy, "other"))[1] == "legacy"  # no rule: the file's default


async def test__a_task_stays_on_its_side_when_the_stage_changes_even_on_another_replica(
        redis_server, emulator, legacy, start_proxy, tmp_path):
    v3, v2 = emulator[0], legacy[0]
    prefix = f"test-{uuid.uuid4().hex}:"
    replicas = [await start_proxy(str(v3.make_url("")), v2_upstream=str(v2.make_url("")), fingerprint_secret=SECRET,
                                  redis_url=redis_server.url, redis_prefix=prefix,
                                  image_hosts=[f"127.0.0.1:{v3.port}", f"127.0.0.1:{v2.port}"])
                for _ in range(2)]
    first, second = replicas
    task_id, served = await submit(first, "legacy")
    assert served == "legacy"
    router = first.server.app[ROUTER]
    await router.change(fp(KEYS["legacy"]), Rule("translated"), by="test", why="moving on")
    await asyncio.sleep(1.2)  # the other replica re-reads the changes every second
    assert second.server.app[ROUTER].rule(fp(KEYS["legacy"])).stage == "translated"
    assert (await finish(second, "legacy", task_id))[1] == "legacy"  # taken by V2: polled on V2
    new_task, served = await submit(second, "legacy")
    assert served == "v3" and (await finish(first, "legacy", new_task))[1] == "v3"
    (event, *_) = await first.server.app[MIGRATION_STORE].events()
    assert (event["from"], event["to"], event["by"], event["why"]) == ("legacy", "translated", "test", "moving on")


async def test__canary__a_client_bucket_decides_and_a_per_call_canary_keeps_each_task_on_its_side(
        start_migrating, tmp_path):
    canary = bucket(fp(KEYS["canary"]))
    in_file = migration_file(tmp_path, canary=("canary", canary + 1, False), other=("canary", canary, False))
    proxy = await start_migrating(in_file)
    assert {(await submit(proxy, "canary"))[1] for _ in range(3)} == {"v3"}  # its bucket is under the percent
    other = bucket(fp(KEYS["other"]))
    expected = "v3" if other < canary else "legacy"
    assert {(await submit(proxy, "other"))[1] for _ in range(3)} == {expected}

    (tmp_path / "per-call").mkdir()
    per_call = await start_migrating(migration_file(tmp_path / "per-call", canary_hash="call",
                                                    canary=("canary", 50, False)))
    seen = {}
    for _ in range(12):
        task_id, served = await submit(per_call, "canary")
        seen[task_id] = served
    assert set(seen.values()) == {"legacy", "v3"}  # 12 draws at 50 %: both sides (1 in 2048 to fail)
    for task_id, served in list(seen.items())[:4]:
        assert (await finish(per_call, "canary", task_id))[1] == served


async def test__forced_route__works_only_where_the_operator_allows_it(start_migrating, tmp_path):
    file = migration_file(tmp_path, forcing=("legacy", 0, True))
    proxy = await start_migrating(file)
    forced = {"X-Upscale-Proxy-Route": "v3"}
    assert (await submit(proxy, "forcing", **forced))[1] == "v3"
    assert (await submit(proxy, "other", **forced))[1] == "legacy"  # not allowed: its stage decides
    everyone = await start_migrating(file, allow_route_header=True)
    assert (await submit(everyone, "other", **forced))[1] == "v3"


async def test__v2_answering_410__moves_every_client_to_the_translation_once_until_the_operator_undoes_it(
        start_migrating, legacy, log_lines):
    proxy = await start_migrating(admin_token=ADMIN)
    legacy[1].settings.gone = 410
    task_id, served = await submit(proxy, "legacy")  # the call that found V2 gone is translated
    assert served == "v3"
    assert (await finish(proxy, "legacy", task_id))[1] == "v3"
    assert (await submit(proxy, "other"))[1] == "v3"
    assert proxy.server.app[ROUTER].gone == "V2 answered HTTP 410 to /v2/upscale"
    gone = [line for line in log_lines if line["event"] == "migration.v2_gone"]
    assert len(gone) == 1 and gone[0]["level"] == "warning"
    (event, *_) = await proxy.server.app[MIGRATION_STORE].events()
    assert (event["to"], event["source"]) == ("translated", "fall-forward")

    legacy[1].settings.gone = None  # V2 is back: the operator says so, and clients go back to their stages
    admin = {"Authorization": f"Bearer {ADMIN}"}
    async with proxy.delete("/_proxy/migration/v2-gone?why=V2+is+back", headers=admin) as resp:
        assert resp.status == 200 and (await resp.json()) == {"v2_gone": None, "cleared": True}
    assert proxy.server.app[ROUTER].gone is None and (await submit(proxy, "other"))[1] == "legacy"
    async with proxy.delete("/_proxy/migration/v2-gone") as resp:
        assert resp.status == 401


async def test__v2_down__a_legacy_submission_gets_code_5_and_its_polls_ride_through(start_migrating, legacy):
    proxy = await start_migrating()
    task_id, _ = await submit(proxy, "legacy")
    known = await v2_call(proxy, "GET", f"/v2/progress?task_id={task_id}", headers=headers("legacy"))
    await legacy[0].close()
    refused = await v2_call(proxy, "POST", "/v2/upscale", json=body(DIRECT), headers=headers("legacy"))
    assert refused["code"] == 5 and "legacy V2 unreachable" in refused["msg"]
    during = await v2_call(proxy, "GET", f"/v2/progress?task_id={task_id}", headers=headers("legacy"))
    assert during == known


async def test__v2s_own_errors_on_a_poll__transient_ones_ridden_through_others_with_data(start_migrating, legacy):
    proxy = await start_migrating()
    task_id, _ = await submit(proxy, "legacy")
    known = await v2_call(proxy, "GET", f"/v2/progress?task_id={task_id}", headers=headers("legacy"))
    legacy[1].settings.error_code, legacy[1].settings.error_endpoints = 5, ["progress"]
    assert await v2_call(proxy, "GET", f"/v2/progress?task_id={task_id}", headers=headers("legacy")) == known
    legacy[1].settings.error_code = 4  # v2_call checks every progress reply has data, as SDK loops need
    refused = await v2_call(proxy, "GET", f"/v2/progress?task_id={task_id}", headers=headers("legacy"))
    assert refused["code"] == 4 and refused["data"]["status"] == 3


# --- shadow comparisons ---------------------------------------------------------------------------------

async def comparisons(proxy, count: int) -> list[dict]:
    store = proxy.server.app[MIGRATION_STORE]
    for _ in range(300):
        found = await store.comparisons()
        if len(found) >= count:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"{count} comparisons never came: {await store.comparisons()}")


async def test__shadow__the_same_line_matches_and_another_line_is_a_mismatch_with_its_figures(
        start_migrating, legacy, tmp_path):
    # native passes emulated: the translation runs the model at 4x and resizes locally, as V2 did
    proxy = await start_migrating(migration_file(tmp_path, shadow=("shadow", 0, False)), shadow_noise_every=1,
                                  policy_native_scale="emulate")
    task_id, served = await submit(proxy, "shadow", EXACT_CROP)
    assert served == "legacy"
    await finish(proxy, "shadow", task_id)
    (same,) = await comparisons(proxy, 1)
    assert same["outcome"] == "match" and same["psnr"] == "inf", same
    assert same["noise"]["outcome"] == "match"  # V2 against itself: the emulator is deterministic

    legacy[1].settings.a1111_profile = "v1.6"  # V2 ran another release line than the proxy's
    task_id, _ = await submit(proxy, "shadow", EXACT_CROP)
    await finish(proxy, "shadow", task_id)
    latest, _ = await comparisons(proxy, 2)
    # v1.6 upscales to 24 x 16 (multiples of 8) and centres that on the 30 x 22 canvas: black bars
    assert latest["outcome"] == "mismatch" and "pixels differ" in latest["why"], latest
    assert latest["sizes"] == [[30, 22], [30, 22]] and latest["psnr"] < 40 and latest["images"], latest
    for name in ("v2", "v3", "heat"):  # the three images of the side-by-side view
        png = await proxy.server.app[RESULTS].get(f"shadow-{latest['id']}-{name}.png")
        assert decode(png).size == (30, 22)
    await proxy.server.app[USAGE].flush()
    rows = (await v2_usage(proxy))
    assert rows[fp(KEYS["shadow"])]["shadow"] == {"match": 1, "mismatch": 1}


async def v2_usage(proxy) -> dict[str, dict]:
    from proxy.usage import view
    app = proxy.server.app
    table = await view.clients(app[USAGE].store, app[USAGE].context(), view.Filters())
    return {row["client"]: row for row in table["clients"]}


async def test__shadow__an_approximated_model_is_explained_not_a_mismatch(start_migrating, tmp_path):
    proxy = await start_migrating(migration_file(tmp_path, shadow=("shadow", 0, False)), shadow_noise_every=0)
    task_id, _ = await submit(proxy, "shadow", {"upscaler_1": "R-ESRGAN 4x+", "upscaling_resize": 4})
    await finish(proxy, "shadow", task_id)
    (found,) = await comparisons(proxy, 1)
    assert found["outcome"] == "explained" and "model" in found["explained_by"], found


async def test__shadow__stays_within_its_budget(start_migrating, emulator, tmp_path):
    proxy = await start_migrating(migration_file(tmp_path, shadow=("shadow", 0, False)), shadow_max_per_minute=2,
                                  shadow_noise_every=0)
    tasks = [(await submit(proxy, "shadow"))[0] for _ in range(5)]
    for task_id in tasks:
        await finish(proxy, "shadow", task_id)
    await comparisons(proxy, 2)
    await asyncio.sleep(0.3)
    assert len(await proxy.server.app[MIGRATION_STORE].comparisons()) == 2
    assert emulator[1].requests["submit"] == 2  # only the shadows went to V3: 2 of 5
    assert proxy.server.app[MIGRATION].shadows.skipped == 3


# --- rollback -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("stage", "percent", "back", "back_percent", "then"), [
    ("canary", 100, "shadow", 0, "legacy"),
    ("translated", 0, "canary", 100, "v3"),  # a canary stepped back to takes UPSCALE_PROXY_PROMOTE_PERCENT
])
async def test__a_failing_client__steps_back_one_stage_with_the_figures_that_made_it(
        start_migrating, emulator, tmp_path, stage, percent, back, back_percent, then):
    proxy = await start_migrating(migration_file(tmp_path, canary=(stage, percent, False)), rollback_min_calls=3,
                                  rollback_window=5, shadow_max_per_minute=0, promote_percent=back_percent or 10)
    emulator[1].settings.fail_rate = 1.0  # every V3 job fails
    for _ in range(3):
        task_id, served = await submit(proxy, "canary")
        assert served == "v3"
        assert (await poll_until_done(proxy, task_id, headers=headers("canary")))["status"] == 3
    router = proxy.server.app[ROUTER]
    for _ in range(100):
        if router.rule(fp(KEYS["canary"])).stage != stage:
            break
        await asyncio.sleep(0.02)
    rule = router.rule(fp(KEYS["canary"]))
    assert (rule.stage, rule.percent, rule.source, rule.by) == (back, back_percent, "rollback", "proxy")
    assert rule.hold_until > 0
    assert "3 of its last 3 translated calls failed" in rule.why and "failed 3, calls 3" in rule.why
    (event, *_) = await proxy.server.app[MIGRATION_STORE].events()
    assert (event["from"], event["to"], event["source"]) == (stage, back, "rollback")
    assert event["figures"] == {"failed": 3, "calls": 3, "max_failure_rate": 0.2}
    assert (await submit(proxy, "canary"))[1] == then  # a step back: V2 again, or a canary's share


# --- a legacy SDK, unchanged, in every stage ------------------------------------------------------------

@pytest.mark.parametrize("stage", ["legacy", "shadow", "canary", "translated"])
async def test__legacy_sdk__works_unchanged_in_every_stage(start_migrating, tmp_path, stage):
    proxy = await start_migrating(migration_file(tmp_path, other=(stage, 100, False)))
    sdk = NovitaClient(KEYS["other"], base_url=str(proxy.make_url("")).rstrip("/"))
    image = base64.b64encode(encode(pattern(12, 9))).decode()
    request = UpscaleRequest(image=image, upscaler_1="4x-UltraSharp", resize_mode=UpscaleResizeMode.SIZE,
                             upscaling_resize_w=30, upscaling_resize_h=20, upscaling_crop=True)
    submitted = await asyncio.to_thread(sdk.upscale, request)
    done = await asyncio.to_thread(sdk.wait_for_task, submitted.data.task_id, 60)
    assert done.data.status.value == 2
    async with proxy.session.get(done.data.imgs[0]) as resp:
        assert decode(await resp.read()).size == (30, 20)


# --- the migration file -------------------------------------------------------------------------------

def test__the_example_migration_file__is_one_the_proxy_takes():
    rules = Rules.load(Path(__file__).parent.parent / "deploy" / "migration.example.toml")
    assert rules.default.stage == "legacy" and rules.canary_hash == "client"
    assert rules.by_fingerprint["0123456789abcdef"].stage == "shadow"
    canary = rules.by_label["billing team"]
    assert (canary.stage, canary.percent, canary.allow_route) == ("canary", 25, True)


@pytest.mark.parametrize(("text", "words"), [
    ('default = "sideways"', "default"),
    ('[[clients]]\nstage = "shadow"', "fingerprint or its label"),
    ('[[clients]]\nfingerprint = "xyz"\nstage = "shadow"', "clients.0.fingerprint"),
    ('[[clients]]\nlabel = "a"\nstage = "canary"\npercent = 101', "clients.0.percent"),
    ("default = ", "not TOML"),
])
def test__a_bad_migration_file__stops_the_start_naming_what_is_wrong(tmp_path, text, words):
    path = tmp_path / "migration.toml"
    path.write_text(text)
    with pytest.raises(MigrationFileError, match=words):
        Rules.load(path)
    with pytest.raises(ValueError, match="UPSCALE_PROXY_MIGRATION_FILE|migration_file"):
        Settings(migration_file=path)
