"""The V2 edge (its units, in their order) and the app's wiring, through real servers on loopback."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.app import periodic
from proxy.errors import V2Status
from proxy.v2.audit_record import AuditRecord
from tests.helpers import AUTH, closed_port_url, upscale, v2_call
from tests.images import b64

BODY = {"image": b64(), "upscaler_1": "R-ESRGAN 4x+ Anime6B", "upscaling_resize": 2}


# --- every answered V2 call: a V2 body, the deprecation headers, one audit event ------------------

async def v2_answer(client: TestClient, method: str, path: str, **kw) -> tuple[dict, dict]:
    async with client.request(method, path, **kw) as resp:
        assert resp.status == 200
        return await resp.json(), dict(resp.headers)


async def test__every_kind_of_v2_answer__has_headers_and_exactly_one_audit_event(emulator, start_proxy,
                                                                                 log_lines):
    now = datetime.now(UTC)
    client = await start_proxy(str(emulator[0].make_url("")), brownouts=[{
        "start": (now - timedelta(hours=1)).isoformat(), "end": (now + timedelta(hours=1)).isoformat(),
        "allow": []}])
    calls = [("POST", "/v2/upscale"), ("GET", "/v2/progress?task_id=abc"), ("GET", "/v2/nothing-here"),
             ("DELETE", "/v2/upscale"), ("GET", "/v2")]
    for method, path in calls:
        reply, headers = await v2_answer(client, method, path, json=BODY, headers=AUTH)
        assert reply["code"] == 10 and "Deprecation" in headers
    events = log_lines.requests()
    assert [(e["method"], e["path"]) for e in events] == [(m, p.split("?")[0]) for m, p in calls]
    assert {e["path_taken"] for e in events} == {"brownout"}


async def test__errors_of_every_origin__are_v2_bodies_with_one_event_each(proxy, log_lines):
    calls = [
        ("POST", "/v2/upscale", {"data": b"{nope"}, 1, "refused"),  # a V2Error from parsing
        ("GET", "/v2/progress?task_id=0b9d5b0e-4c1e-4df1-a4c5-1f0d0f3d8a11", {}, 3, "direct"),  # a V3Error
        ("GET", "/v2/nothing-here", {}, 10, "refused"),  # aiohttp's 404
        ("PUT", "/v2/progress", {}, 10, "refused"),  # aiohttp's 405
    ]
    for method, path, kw, code, _ in calls:
        reply, headers = await v2_answer(proxy, method, path, headers=AUTH, **kw)
        assert reply["code"] == code and headers["Deprecation"].startswith("@")
    events = log_lines.requests()
    assert [(e["v2_code"], e["path_taken"]) for e in events] == [(c, p) for *_, c, p in calls]
    assert all(e["msg"] for e in events)
    assert events[1]["upstream_status"] == 404 and "TASK_NOT_FOUND" in events[1]["msg"]


async def test__non_v2_paths__get_no_v2_body_headers_or_audit_event(proxy, log_lines):
    async with proxy.get("/v3/async/task-result?task_id=nope", headers=AUTH) as resp:
        assert resp.status == 404 and (await resp.json())["reason"] == "TASK_NOT_FOUND"
        assert "Deprecation" not in resp.headers
    for path in ("/healthz", "/readyz", "/metrics", "/_proxy/guide", "/nowhere"):
        async with proxy.get(path) as resp:
            assert "Deprecation" not in resp.headers
    async with proxy.get("/nowhere") as resp:
        assert resp.status == 404  # aiohttp's own, not a V2 body
    assert log_lines.requests() == []


async def test__v3_pass_through_to_a_closed_port__says_so_without_the_address(start_proxy, log_lines):
    url = closed_port_url()
    client = await start_proxy(url)
    async with client.get("/v3/async/task-result?task_id=abc", headers=AUTH) as resp:
        assert resp.status == 502
        error = await resp.json()
    assert error["reason"] == "UPSTREAM_UNAVAILABLE" and url.split("//")[1] not in error["message"]
    failed = [line for line in log_lines if line["event"] == "v3 pass-through failed"]
    assert url.split(":")[-1] in failed[0]["detail"]  # the operator gets the detail


async def test__unreachable_upstream__detail_goes_to_the_log_not_the_client(start_proxy, log_lines):
    url = closed_port_url()
    client = await start_proxy(url, upstream_retries=0)
    reply = await upscale(client, {"image": b64(), "upscaling_resize": 2})
    assert reply["code"] == 5 and reply["msg"] == "upstream unreachable: could not connect to V3"
    poll = await v2_call(client, "GET", "/v2/progress?task_id=abc")  # ridden through: nothing alarming
    assert (poll["code"], poll["msg"]) == (0, "")
    failed = [line for line in log_lines if line["event"] == "upstream call failed"]
    assert [line["error"] for line in failed] == ["V3Unreachable"] * 2
    assert all(url.split(":")[-1] in line["detail"] for line in failed)
    submitted, polled = log_lines.requests()
    assert submitted["msg"] == reply["msg"] and submitted["path_taken"] == "direct"
    assert polled["msg"] == "V3: could not connect to V3" and polled["ride_through"] == "unseen"
    assert url.split("//")[1] not in polled["msg"]
    assert "upstream_status" not in submitted and "upstream_status" not in polled  # no reply came


# --- the audit record -----------------------------------------------------------------------------

def test__audit_record__renders_the_set_attributes_with_the_event_keys():
    record = AuditRecord("POST", "/v2/upscale", "upscale", "sdk/1", started=10.0, fingerprint="f" * 16)
    record.fields, record.features, record.warnings = ["image"], {"model": "approximate"}, ["w"]
    record.path_taken, record.upstream_status, record.task_id = "direct", 200, "t"
    assert record.event(now=10.5) == {
        "method": "POST", "path": "/v2/upscale", "endpoint": "upscale", "fingerprint": "f" * 16,
        "user_agent": "sdk/1", "path_taken": "direct", "v2_code": 0, "latency_ms": 500.0,
        "fields": ["image"], "features": {"model": "approximate"}, "warnings": ["w"],
        "upstream_status": 200, "task_id": "t",
    }


def test__audit_record__without_a_path__is_refused_when_it_failed_else_direct():
    record = AuditRecord("GET", "/v2/progress", "progress", "", started=0.0)
    assert record.final_path == "direct"
    record.v2_code = 4
    assert record.final_path == "refused"
    assert set(record.event(now=0.0)) == {"method", "path", "endpoint", "fingerprint", "user_agent",
                                          "path_taken", "v2_code", "latency_ms"}


def test__v2_status__final_are_successful_failed_and_timeout():
    assert [s for s in V2Status if s.final] == [V2Status.SUCCESSFUL, V2Status.FAILED, V2Status.TIMEOUT]
    assert V2Status(1) is V2Status.RUNNING and not V2Status.INITIALIZING.final


# --- wiring ---------------------------------------------------------------------------------------

LAZY_IMPORT = """
import asyncio, sys
from aiohttp import web
from proxy.app import create_app
from proxy.settings import Settings

async def main():
    app = create_app(Settings(data_dir=sys.argv[1], emulate_v3=sys.argv[2] == "emulate"))
    created = "proxy.emulator" in sys.modules
    runner = web.AppRunner(app)
    await runner.setup()  # every cleanup_ctx starts
    started = "proxy.emulator" in sys.modules
    await runner.cleanup()
    print(f"{created} {started}")

asyncio.run(main())
"""


@pytest.mark.parametrize(("mode", "imported"), [("upstream", "False False"), ("emulate", "False True")])
def test__the_emulator__is_imported_only_when_it_runs(tmp_path, mode, imported):
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPSCALE_PROXY_")}
    env["UPSCALE_PROXY_EMULATOR_PORT"] = "0"
    out = subprocess.run([sys.executable, "-c", LAZY_IMPORT, str(tmp_path), mode], capture_output=True,
                         text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == imported


async def test__periodic_job__runs_until_cleanup_then_is_cancelled_awaited_and_run_once_more(aiohttp_client):
    runs: list[str] = []

    async def step(app: web.Application) -> None:
        runs.append("run")
        if len(runs) == 2:
            raise RuntimeError("a failing step does not stop the loop")

    app = web.Application()
    app.cleanup_ctx.append(periodic("test job", 0, step, last_run=True))
    client = await aiohttp_client(app)
    while len(runs) < 4:
        await asyncio.sleep(0)
    jobs = [t for t in asyncio.all_tasks() if t.get_name() == "test job"]
    await client.close()
    assert jobs[0].cancelled()
    counted = len(runs)
    await asyncio.sleep(0.01)
    assert len(runs) == counted  # nothing runs after cleanup (the last run was part of it)


async def test__create_app__serves_with_every_resource_and_closes_cleanly(emulator, start_proxy):
    client = await start_proxy(str(emulator[0].make_url("")))
    reply = await upscale(client, {**BODY, "upscaler_1": "Lanczos"})  # composed: stores, executor, composer
    assert reply["code"] == 0
    poll = await v2_call(client, "GET", f"/v2/progress?task_id={reply['data']['task_id']}")
    assert poll["code"] == 0
    await client.close()  # every cleanup_ctx closes, in reverse order, without a warning
