"""The migration toolkit: deprecation headers, audit events, the usage report, the guide,
brownouts, the translate preview, V3 pass-through, metrics and health."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import hmac
import io
import json
import re
import subprocess
import sys
import zlib
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

import orjson
import pytest
from aiohttp import web

from proxy import audit, mappings
from proxy.guide import guide
from proxy.v2.models import V2_FIELDS
from tests.helpers import AUTH, KEY, upscale, v2_call
from tests.images import b64

SECRET = "audit-secret"
DEPRECATED = datetime(2025, 3, 1, tzinfo=UTC)
SUNSET = datetime(2027, 6, 30, 12, 0, tzinfo=UTC)
BODY = {"image": b64(), "upscaler_1": "R-ESRGAN 4x+ Anime6B", "upscaling_resize": 2}
IMF_FIXDATE = re.compile(r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
                         r"\d{4} \d{2}:\d{2}:\d{2} GMT$")
LINK = re.compile(r'^<([^>]*)>\s*;\s*rel="([^"]+)"')


def fp(key: str) -> str:
    return hmac.new(SECRET.encode(), key.encode(), hashlib.sha256).hexdigest()[:16]


@pytest.fixture
async def migrating(emulator, start_proxy):
    """A proxy with a deprecation date, a sunset date and a known fingerprint secret."""
    return await start_proxy(str(emulator[0].make_url("")), deprecation_date=DEPRECATED, sunset_date=SUNSET,
                             fingerprint_secret=SECRET)


def links(headers) -> dict[str, str]:
    return {m.group(2): m.group(1) for value in headers.getall("Link", []) if (m := LINK.match(value))}


# --- deprecation headers ------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "path", "successor"), [
    ("POST", "/v2/upscale", "/v3/async/upscale"),
    ("GET", "/v2/progress?task_id=abc", "/v3/async/task-result"),
    ("GET", "/v2/nothing-here", None),
])
async def test__every_v2_response__carries_rfc_deprecation_sunset_and_links(migrating, method, path, successor):
    async with migrating.request(method, path, json=BODY, headers=AUTH) as resp:
        assert resp.status == 200
        deprecation = resp.headers["Deprecation"]
        sunset = resp.headers["Sunset"]
        found = links(resp.headers)
    assert re.fullmatch(r"@\d+", deprecation) and int(deprecation[1:]) == int(DEPRECATED.timestamp())  # RFC 9745
    assert IMF_FIXDATE.match(sunset) and parsedate_to_datetime(sunset) == SUNSET  # RFC 8594
    assert found["deprecation"] == "/_proxy/guide"
    assert found.get("successor-version") == successor


async def test__without_a_sunset_date__there_is_no_sunset_header(proxy):
    async with proxy.post("/v2/upscale", json=BODY, headers=AUTH) as resp:
        assert "Sunset" not in resp.headers and resp.headers["Deprecation"].startswith("@")


async def test__v3_and_operations_responses__carry_no_deprecation(migrating):
    async with migrating.get("/healthz") as resp:
        assert "Deprecation" not in resp.headers


# --- audit events -------------------------------------------------------------------------------

async def test__each_v2_call__is_one_audit_event_with_the_fingerprint_never_the_key(migrating, log_lines):
    body = {**BODY, "upscaler_1": "R-ESRGAN 4x+", "gfpgan_visibility": 0.3, "upscaler_2": None}
    reply = await upscale(migrating, body, headers={**AUTH, "User-Agent": "legacy-sdk/1.2"})
    task_id, polls = reply["data"]["task_id"], 0
    while True:  # poll until done, counting the polls: each is one more audit event
        polls += 1
        poll = await v2_call(migrating, "GET", f"/v2/progress?task_id={task_id}")
        if poll["data"]["status"] in (2, 3, 4) or polls == 200:
            break
        await asyncio.sleep(0.02)
    assert poll["data"]["status"] == 2
    events = log_lines.requests()
    submit = events[0]
    assert submit["event"] == "v2.deprecated_call"
    assert submit["fingerprint"] == fp(KEY) and KEY not in log_lines.text
    assert submit["user_agent"] == "legacy-sdk/1.2" and submit["endpoint"] == "upscale"
    assert submit["fields"] == ["image", "upscaler_1", "upscaling_resize", "gfpgan_visibility"]
    assert submit["path_taken"] == "direct" and submit["v2_code"] == 0 and submit["upstream_status"] == 200
    assert submit["features"] == {"face": "skip", "model": "approximate", "native_scale": "approximate"}
    assert len(submit["warnings"]) == 2 and submit["latency_ms"] > 0
    assert len(events) == 1 + polls  # one per call: the submit, then each poll
    assert [e["endpoint"] for e in events[1:]] == ["progress"] * polls
    assert all(e["task_id"] == task_id and e["fingerprint"] == fp(KEY) for e in events[1:])


async def test__refused_and_composed_calls__say_their_path(migrating, log_lines):
    await upscale(migrating, {**BODY, "upscaling_resize": 0})
    await upscale(migrating, {**BODY, "upscaler_1": "Lanczos"})
    refused, composed = log_lines.requests()
    assert (refused["path_taken"], refused["v2_code"]) == ("refused", 6)
    assert (composed["path_taken"], composed["features"]) == ("composed", {"local_upscaler": "emulate"})


# --- the usage report, on a log made by real calls -----------------------------------------------

async def test__usage_report__tells_each_client_what_to_change(migrating, log_lines, tmp_path):
    other = {"Authorization": "Bearer sk-other-client", "User-Agent": "script/0.1"}
    for _ in range(3):
        await upscale(migrating, BODY, headers={**AUTH, "User-Agent": "sdk/2"})  # fine as it is
    await upscale(migrating, {**BODY, "resize_mode": 1, "upscaling_resize_w": 100, "upscaling_resize_h": 80,
                              "upscaling_crop": True}, headers=other)
    await upscale(migrating, {**BODY, "img_expire_ttl": 86400, "upscaler_1": "R-ESRGAN 4x+"}, headers=other)
    await v2_call(migrating, "GET", "/v2/progress?task_id=abc", headers={})  # anonymous
    log = tmp_path / "proxy.log"
    log.write_text(log_lines.text + "not json\n")
    events = list(audit.read_events(log.read_bytes().splitlines()))
    assert len(events) == 6
    assert all(e["features"]["native_scale"] == "approximate" for e in events if e["endpoint"] == "upscale")
    rows = {r["fingerprint"]: r for r in audit.report(events)}
    assert set(rows) == {fp(KEY), fp("sk-other-client"), "anonymous"}
    sdk, script = rows[fp(KEY)], rows[fp("sk-other-client")]
    assert sdk["calls"] == 3 and sdk["user_agents"] == {"sdk/2": 3} and sdk["verdict"] == "can switch to V3 as is"
    assert sdk["features"] == {}  # native_scale: V3 does it its own way, nothing to change
    assert script["calls"] == 2 and set(script["features"]) == {"scale_to", "crop", "img_expire_ttl", "model"}
    assert script["verdict"].startswith("depends on features V3 lacks: ") and "crop" in script["verdict"]
    assert "no crop" in script["features"]["crop"]["v3"]
    assert sdk["first_seen"] <= sdk["last_seen"]

    text = subprocess.run([sys.executable, "-m", "proxy", "audit", str(log)], capture_output=True, text=True)
    assert text.returncode == 0 and f"client {fp(KEY)}: 3 calls" in text.stdout
    assert "can switch to V3 as is" in text.stdout and "scale to" not in text.stdout
    as_json = subprocess.run([sys.executable, "-m", "proxy", "audit", "--json", "-"], input=log.read_text(),
                             capture_output=True, text=True)
    assert {r["fingerprint"]: r["calls"] for r in json.loads(as_json.stdout)}[fp("sk-other-client")] == 2


# --- the guide ----------------------------------------------------------------------------------

def test__guide__names_every_v2_field_and_upscaler():
    text = guide(mappings.load())
    missing = [name for name in V2_FIELDS if f"### `{name}`" not in text]
    assert not missing
    assert all(f"`{name}`" in text for name in mappings.load().upscalers.upscalers)


async def test__guide__is_served_where_the_deprecation_link_points(migrating):
    async with migrating.post("/v2/upscale", json=BODY, headers=AUTH) as resp:
        target = links(resp.headers)["deprecation"]
    async with migrating.get(target) as resp:
        assert resp.status == 200 and resp.content_type == "text/markdown"
        assert (await resp.text()).startswith("# Moving from Upscale V2 to V3")


def test__guide_command__prints_the_same_guide():
    out = subprocess.run([sys.executable, "-m", "proxy", "guide"], capture_output=True, text=True, check=True)
    assert out.stdout == guide(mappings.load())


# --- brownouts ----------------------------------------------------------------------------------

def window(start_h: float, end_h: float, **kw) -> dict:
    now = datetime.now(UTC)
    return {"start": (now + timedelta(hours=start_h)).isoformat(), "end": (now + timedelta(hours=end_h)).isoformat(), **kw}


@pytest.mark.parametrize(("when", "refused"), [((-3, -1), False), ((-1, 1), True), ((1, 3), False)])
async def test__brownout_window__refuses_only_while_it_is_on(emulator, start_proxy, log_lines, when, refused):
    client = await start_proxy(str(emulator[0].make_url("")), sunset_date=SUNSET, brownouts=[window(*when)])
    async with client.post("/v2/upscale", json=BODY, headers=AUTH) as resp:
        assert resp.status == 200  # never 429: legacy SDKs would raise
        reply = await resp.json()
    if refused:
        assert reply["code"] == 10 and reply["data"] is None
        assert "2027-06-30" in reply["msg"] and "/_proxy/guide" in reply["msg"]
        assert log_lines.requests()[-1]["path_taken"] == "brownout"
        assert emulator[1].requests["submit"] == 0
    else:
        assert reply["code"] == 0


async def test__brownout__spares_allowed_clients_and_refuses_a_fraction(emulator, start_proxy):
    client = await start_proxy(str(emulator[0].make_url("")), fingerprint_secret=SECRET,
                               brownouts=[window(-1, 1, fraction=0.5, allow=[fp(KEY)])])
    codes = [(await v2_call(client, "GET", "/v2/progress?task_id=abc"))["code"] for _ in range(20)]
    assert 10 not in codes  # allowed
    others = [(await v2_call(client, "GET", "/v2/progress?task_id=abc",
                             headers={"Authorization": "Bearer someone"}))["code"] for _ in range(200)]
    assert 60 < others.count(10) < 140  # half, give or take (binomial, n=200)


# --- translate preview --------------------------------------------------------------------------

async def test__translate_preview__shows_the_v3_requests_without_calling_upstream(migrating, emulator):
    body = {**BODY, "resize_mode": 1, "upscaling_resize_w": 300, "upscaling_resize_h": 200, "upscaling_crop": True,
            "upscaler_2": "Lanczos", "extras_upscaler_2_visibility": 0.3}
    reply = await v2_call(migrating, "POST", "/_proxy/translate", json=body)
    preview = reply["data"]
    assert preview["path"] == "composed" and preview["output"] == {"width": 300, "height": 200}
    request = preview["v3_requests"][0]["request"]
    assert request["model_name"] == "RealESRGAN_x4plus_anime_6B" and request["scale_factor"] == 4
    assert request["image_base64"].startswith("<base64 of the input: PNG 64x48")
    assert any("centred on a black 300x200" in step for step in preview["local_steps"])
    assert preview["policies"] == {"scale_to": "emulate", "crop": "emulate", "upscaler_2": "emulate",
                                   "local_upscaler": "emulate", "factor": "emulate"}
    assert sum(emulator[1].requests.values()) == 0
    assert (await v2_call(migrating, "POST", "/_proxy/translate", json={**body, "upscaler_1": "nope"}))["code"] == 2


def test__translate_command__prints_the_same_preview(tmp_path):
    path = tmp_path / "body.json"
    path.write_text(json.dumps(BODY))
    out = subprocess.run([sys.executable, "-m", "proxy", "translate", str(path)], capture_output=True, text=True)
    assert out.returncode == 0
    preview = json.loads(out.stdout)
    assert preview["path"] == "direct" and preview["v3_requests"][0]["request"]["scale_factor"] == 2
    bad = subprocess.run([sys.executable, "-m", "proxy", "translate", "-"], input="{}", capture_output=True, text=True)
    assert bad.returncode == 1 and "code 1" in bad.stderr


# --- V3 pass-through ----------------------------------------------------------------------------

async def test__v3_calls__pass_through_to_the_upstream(proxy, emulator):
    body = {"request": {"model_name": "4x-UltraSharp", "scale_factor": 2, "image_base64": b64(8, 8)}}
    async with proxy.post("/v3/async/upscale", json=body, headers=AUTH) as resp:
        assert resp.status == 200 and "Deprecation" not in resp.headers
        task_id = (await resp.json())["task_id"]
    async with proxy.get(f"/v3/async/task-result?task_id={task_id}", headers=AUTH) as resp:
        assert resp.status == 200 and (await resp.json())["task"]["task_id"] == task_id
    async with proxy.get("/v3/async/task-result?task_id=nope", headers=AUTH) as resp:
        assert resp.status == 404 and (await resp.json())["reason"] == "TASK_NOT_FOUND"  # V3's own error


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test__v3_pass_through__a_compressed_request_body_reaches_v3_as_a_body_it_reads(proxy, emulator, encoding):
    raw = orjson.dumps({"request": {"model_name": "4x-UltraSharp", "scale_factor": 2, "image_base64": b64(8, 8)}})
    packed = gzip.compress(raw) if encoding == "gzip" else zlib.compress(raw)
    async with proxy.post("/v3/async/upscale", data=packed, headers={
            **AUTH, "Content-Encoding": encoding, "Content-Type": "application/json"}) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["task_id"]
    assert emulator[1].requests["submit"] == 1


@pytest.fixture
async def echo(aiohttp_server):
    """An upstream that reports what reached it, and streams large replies."""
    seen: list[dict] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(1 << 16):
            digest.update(chunk)
            size += len(chunk)
        seen.append({"method": request.method, "path_qs": request.raw_path, "headers": dict(request.headers),
                     "size": size, "sha256": digest.hexdigest()})
        n = int(request.query.get("reply_mb", "0"))
        response = web.StreamResponse(headers={"X-Upstream": "yes", "Connection": "keep-alive"})
        response.content_length = n * (1 << 20)
        await response.prepare(request)
        for _ in range(n):
            await response.write(bytes(range(256)) * 4096)
        await response.write_eof()
        return response

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", handler)
    return await aiohttp_server(app), seen


async def test__v3_pass_through__streams_both_ways_and_drops_hop_by_hop_headers(echo, start_proxy):
    server, seen = echo
    client = await start_proxy(str(server.make_url("")))
    upload = bytes(range(256)) * (80 * 4096)  # 80 MiB would not fit the V2 body limit; /v3 is not buffered
    async with client.put("/v3/some/path?x=1&y=a%26b%2Bc", data=io.BytesIO(upload), headers={
            "Authorization": "Bearer k", "X-Custom": "kept", "Connection": "X-Hop", "X-Hop": "dropped",
            "Proxy-Authorization": "secret"}) as resp:
        assert resp.status == 200 and resp.headers["X-Upstream"] == "yes"
    got = seen[0]
    assert got["method"] == "PUT" and got["path_qs"] == "/v3/some/path?x=1&y=a%26b%2Bc"
    assert got["size"] == len(upload) and got["sha256"] == hashlib.sha256(upload).hexdigest()
    assert got["headers"].get("Content-Length") == str(len(upload))  # not re-chunked
    assert got["headers"]["Authorization"] == "Bearer k" and got["headers"]["X-Custom"] == "kept"
    assert "X-Hop" not in got["headers"] and "Proxy-Authorization" not in got["headers"]
    async with client.get("/v3/download?reply_mb=64") as resp:
        digest, size = hashlib.sha256(), 0
        async for chunk in resp.content.iter_chunked(1 << 16):
            digest.update(chunk)
            size += len(chunk)
    assert size == 64 << 20
    assert digest.hexdigest() == hashlib.sha256((bytes(range(256)) * 4096) * 64).hexdigest()


# --- metrics and health -------------------------------------------------------------------------

async def test__metrics__count_calls_paths_codes_clients_and_upstream_latency(emulator, start_proxy):
    client = await start_proxy(str(emulator[0].make_url("")), metrics_max_clients=2)
    for key in ("a", "b", "c", "d"):
        await upscale(client, BODY, headers={"Authorization": f"Bearer {key}"})
    await upscale(client, {**BODY, "upscaling_resize": 0})
    await upscale(client, {**BODY, "upscaler_1": "Lanczos"})
    async with client.get("/metrics") as resp:
        assert resp.status == 200 and resp.content_type == "text/plain"
        text = await resp.text()
    assert 'upscale_proxy_v2_calls_total{code="0",endpoint="upscale",path="direct"} 4.0' in text
    assert 'upscale_proxy_v2_calls_total{code="6",endpoint="upscale",path="refused"} 1.0' in text
    assert 'upscale_proxy_v2_calls_total{code="0",endpoint="upscale",path="composed"} 1.0' in text
    assert 'upscale_proxy_v2_client_calls_total{client="other"} 4.0' in text  # c, d and KEY: past the bound
    assert 'upscale_proxy_upstream_seconds_count{call="submit"} 4.0' in text
    assert 'upscale_proxy_composed_tasks_total{state="running"} 1.0' in text
    assert "upscale_proxy_in_flight_requests 0.0" in text


async def test__health_and_readiness(proxy):
    async with proxy.get("/healthz") as resp:
        assert resp.status == 200 and (await resp.json()) == {"status": "ok"}
    async with proxy.get("/readyz") as resp:
        assert resp.status == 200 and (await resp.json()) == {"status": "ready", "task_store": "ok"}
    await proxy.server.app.shutdown()  # what a SIGTERM starts: the proxy drains
    async with proxy.get("/readyz") as resp:
        assert resp.status == 503 and (await resp.json()) == {"status": "draining"}
