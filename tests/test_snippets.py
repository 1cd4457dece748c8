"""The dashboard's snippets and notices (proxy/usage/snippets.py): the code for each language is run
for real (Python, JavaScript, curl) against the V3 emulator on loopback, which records the bodies
it is sent; Go too, where a Go toolchain exists. The notices are read for their facts."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy import mappings
from proxy.emulator import EmulatorSettings, create_emulator_app
from proxy.errors import V2Code
from proxy.translate.features import default_policies
from proxy.usage import view
from proxy.usage.snippets import LANGUAGES, notice, snippets_for
from proxy.usage.stores import SqliteUsageStore
from proxy.usage.tally import Tallies
from proxy.usage.view import Context
from proxy.v2.image import ImageInfo
from proxy.v2.translation import Translator, shape_of
from tests.images import decode, encode, pattern

M = mappings.load()
KEY = "sk-snippet-test-not-a-real-key"
BASE = "https://api.novita.ai"
RUN_TIMEOUT = 60


def shape(fields: dict, width: int = 64, height: int = 48, mode: str = "RGB") -> str:
    image = ImageInfo("PNG", width, height, 0, mode, mode == "RGBA")
    return shape_of(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS), image)


DIRECT = shape({"upscaler_1": "R-ESRGAN 4x+ Anime6B", "upscaling_resize": 2})  # one job, 64x48 -> 128x96
CHAINED = shape({"upscaler_1": "R-ESRGAN 4x+ Anime6B", "upscaling_resize": 8})  # two jobs at 4, then a resize
BLENDED = shape({"upscaler_1": "R-ESRGAN 4x+", "resize_mode": 1, "upscaling_resize_w": 300, "upscaling_resize_h": 100,
                 "upscaling_crop": True, "upscaler_2": "4x-UltraSharp", "extras_upscaler_2_visibility": 0.5})
ALPHA = shape({"upscaling_resize": 2}, mode="RGBA")  # V3 gets the pixels as an RGB PNG
LOCAL_ONLY = shape({"upscaler_1": "Lanczos", "upscaling_resize": 2})  # no V3 request at all
SHAPES = [DIRECT, CHAINED, BLENDED, ALPHA, LOCAL_ONLY]


def requests_of(entries: list[dict]) -> list[dict]:
    return [e for e in entries if e["kind"] == "request"]


def without_image(request: dict) -> dict:
    return {**request, "request": {k: v for k, v in request["request"].items() if k != "image_base64"}}


# --- the JSON in each language's code is the preview's request ------------------------------------

def body_in(language: str, code: str) -> dict:
    """The request body written in a snippet, but its image."""
    if language == "python":
        return json.loads(re.search(r'body = json\.loads\(r"""\n(.*?)\n"""\)', code, re.S).group(1))
    if language == "javascript":
        return json.loads(re.search(r"const body = (\{.*?\n\});", code, re.S).group(1))
    if language == "go":
        return json.loads(re.search(r"const bodyJSON = `(.*?)`", code, re.S).group(1))
    # curl: the JSON before and after the image it streams in
    head, tail = re.findall(r"cat <<'JSON'\n(.*?)\nJSON\n", code, re.S)
    body = json.loads(f'{head}"IMAGE"\n{tail}')
    assert body["request"].pop("image_base64") == "IMAGE"
    return body


@pytest.mark.parametrize("body_shape", SHAPES)
def test__snippets__every_language_writes_the_previews_request_exactly(body_shape):
    translator = Translator(M)
    preview = translator.preview_shape(body_shape)
    entries = requests_of(snippets_for(body_shape, translator, BASE))
    assert [e["request"] for e in entries] == preview["v3_requests"]
    for entry in entries:
        assert set(entry["code"]) == set(LANGUAGES)
        for language, code in entry["code"].items():
            assert body_in(language, code) == without_image(entry["request"]), language
            assert f"{BASE}" in code and "/v3/async/upscale" in code and "/v3/async/task-result" in code
            assert "NOVITA_API_KEY" in code and "input.png" in code and "Bearer sk" not in code
        assert json.loads(entry["json"])["request"]["image_base64"] == "<base64 of input.png>"


def test__snippets__a_direct_body_is_one_request_and_the_differences_from_v2():
    entries = snippets_for(DIRECT, Translator(M), BASE)
    assert [e["kind"] for e in entries] == ["request"]  # nothing local, nothing different
    (request,) = entries
    assert request["title"] == ("V3 request 1 of 1: RealESRGAN_x4plus_anime_6B at scale_factor 2, "
                                "64x48 -> 128x96: its image is the answer")
    assert request["input"] == "your image, as you sent it to V2 (PNG 64x48)"
    approximate = snippets_for(shape({"upscaler_1": "R-ESRGAN 4x+", "upscaling_resize": 2}), Translator(M), BASE)
    assert [e["kind"] for e in approximate] == ["request", "warnings"]
    assert "runs as V3 model RealESRNet_x4plus" in approximate[1]["items"][0]


def test__snippets__a_composed_body_chains_requests_and_leaves_the_rest_to_the_client():
    entries = snippets_for(BLENDED, Translator(M), BASE)
    assert [e["kind"] for e in entries] == ["request"] * 4 + ["local", "warnings"]
    assert [e["input"] for e in entries[:4]] == [
        "your image, as you sent it to V2 (PNG 64x48)", "the PNG that request 1 returned (download its image URL)",
        "your image, as you sent it to V2 (PNG 64x48)", "the PNG that request 3 returned (download its image URL)"]
    assert entries[2]["title"].startswith("V3 request 3 of 4: upscaler_2 '4x-UltraSharp': 4x-UltraSharp at")
    local = entries[4]
    assert local["output"] == {"width": 300, "height": 100} and "300x100" in local["text"]
    assert local["items"][1:] == [
        "send V3 request 1", "send V3 request 2",
        "upscaler_1 'R-ESRGAN 4x+': LANCZOS resize to 300x225, locally",
        "upscaler_1 'R-ESRGAN 4x+': centred on a black 300x100 canvas (the crop), locally",
        "send V3 request 3", "send V3 request 4",
        "upscaler_2 '4x-UltraSharp': LANCZOS resize to 300x225, locally",
        "upscaler_2 '4x-UltraSharp': centred on a black 300x100 canvas (the crop), locally",
        "Image.blend(upscaler_1, upscaler_2, 0.5), locally"]


def test__snippets__alpha_is_dropped_before_the_request_and_a_local_upscaler_needs_none():
    alpha = snippets_for(ALPHA, Translator(M), BASE)
    assert [e["kind"] for e in alpha] == ["request", "local", "warnings"]
    assert alpha[0]["input"] == "your image's pixels as an RGB PNG (64x48), made as the steps below say"
    assert alpha[1]["items"][1:] == ["V3 gets those pixels as an RGB PNG, without alpha or a transparency key",
                                     "send V3 request 1"]
    (local,) = snippets_for(LOCAL_ONLY, Translator(M), BASE)
    assert local["kind"] == "local" and local["text"].startswith("This body needs no V3 request")
    assert local["items"][1:] == ["upscaler_1 'Lanczos': LANCZOS resize to 128x96, locally"]


@pytest.mark.parametrize("fields, policy, code, says", [
    ({"upscaler_1": "R-ESRGAN 4x+", "upscaler_2": "4x-UltraSharp", "extras_upscaler_2_visibility": 0.5},
     {"upscaler_2": "strict"}, V2Code.NOT_SUPPORT, "upscaler_2"),
    ({"upscaler_1": "LDSR", "upscaling_resize": 2}, {"model": "strict"}, V2Code.MODEL_NOT_EXIST, "LDSR"),
    ({"upscaling_resize": 64}, {}, V2Code.PARAM_RANGE_OUT_OF_LIMIT, "2048"),
])
def test__snippets__a_shape_refused_now_is_one_entry_saying_why(fields, policy, code, says):
    translator = Translator(M, {**default_policies(), **policy})
    (entry,) = snippets_for(shape(fields), translator, BASE)
    assert entry["kind"] == "error" and entry["v2_code"] == code
    assert says in entry["text"] and f"V2 code {int(code)}" in entry["text"]


# --- the code runs: Python, JavaScript and curl against the V3 emulator ---------------------------

def skip_or_fail(missing: str) -> None:
    """A snippet whose toolchain is missing: skipped here, a failure under CI=true (make test installs it)."""
    if os.environ.get("CI") == "true":
        pytest.fail(missing)
    pytest.skip(missing)


def node_major() -> int:
    node = shutil.which("node")
    if node is None:
        return 0
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout
    return int(version.strip().lstrip("v").split(".")[0])


NO_GO = "go is not installed (make test installs Debian's golang-go as root)"
RUNNERS = {
    "python": (["{python}", "upscale.py"], "upscale.py", lambda: None),
    "javascript": (["node", "upscale.js"], "upscale.js",
                   lambda: None if node_major() >= 18 else "node 18+ is not installed"),
    "curl": (["bash", "upscale.sh"], "upscale.sh",
             lambda: next((f"{tool} is not installed" for tool in ("bash", "curl", "base64") if not shutil.which(tool)),
                          None)),
    "go": (["go", "run", "upscale.go"], "upscale.go", lambda: None if shutil.which("go") else NO_GO),
}


@pytest.fixture
async def v3(aiohttp_server):
    """The V3 emulator (accepting KEY only), recording each call's method, path, query,
    Authorization header and JSON body; and its base URL (with a trailing slash, which the snippets
    must not double)."""
    seen: list[dict] = []

    @web.middleware
    async def record(request: web.Request, handler):
        body = await request.read()  # kept by aiohttp: the handler reads it again
        seen.append({"method": request.method, "path": request.path, "query": dict(request.query),
                     "auth": request.headers.get("Authorization"), "body": json.loads(body) if body else None})
        return await handler(request)

    app = create_emulator_app(EmulatorSettings(queue_delay=0.05, process_delay=0.05, api_keys=[KEY]))
    app.middlewares.append(record)
    server = await aiohttp_server(app)
    return str(server.make_url("/")), seen


async def run(language: str, code: str, folder, *, ok: bool = True) -> tuple[str, str]:
    """Run a snippet in `folder` (which holds input.png) with a fake key: its stdout and stderr,
    once it has succeeded (ok) or failed as it should: exit status 1, nothing on stdout."""
    argv, name, _ = RUNNERS[language]
    (folder / name).write_text(code)
    env = {**os.environ, "NOVITA_API_KEY": KEY, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
           "GOTOOLCHAIN": "local", "GOFLAGS": ""}
    proc = await asyncio.create_subprocess_exec(*[a.format(python=sys.executable) for a in argv], cwd=folder, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT)
    if ok:
        assert proc.returncode == 0, f"{language} snippet failed ({proc.returncode}): {err.decode()}"
    else:
        assert (proc.returncode, out) == (1, b""), f"{language} snippet: {proc.returncode}, {out.decode()}"
    return out.decode(), err.decode()


async def download(url: str) -> bytes:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200 and resp.content_type == "image/png"
        return await resp.read()


@pytest.mark.parametrize("language", list(RUNNERS))
async def test__snippets__run_against_v3_send_the_exact_body_and_print_a_png_url(language, v3, tmp_path):
    if (missing := RUNNERS[language][2]()) is not None:
        skip_or_fail(missing)
    base_url, seen = v3
    image = encode(pattern(64, 48))
    (tmp_path / "input.png").write_bytes(image)
    translator = Translator(M)
    (entry,) = requests_of(snippets_for(DIRECT, translator, base_url))
    out, _ = await run(language, entry["code"][language], tmp_path)
    urls = out.split()
    assert len(urls) == 1 and urls[0].startswith("http://127.0.0.1:")
    result = decode(await download(urls[0]))
    assert (result.format, result.size) == ("PNG", (128, 96))
    (submit,) = [call for call in seen if call["method"] == "POST"]
    expected = translator.preview_shape(DIRECT)["v3_requests"][0]
    expected["request"]["image_base64"] = base64.b64encode(image).decode()
    assert submit["path"] == "/v3/async/upscale" and submit["body"] == expected
    polls = [call for call in seen if call["path"] == "/v3/async/task-result"]
    assert polls and all(call["method"] == "GET" for call in polls)
    assert {call["query"]["task_id"] for call in polls} == {urls[0].rsplit("/", 1)[1].removesuffix(".png")}
    assert {call["auth"] for call in seen if call["path"].startswith("/v3/")} == {f"Bearer {KEY}"}


async def test__snippets__a_chain_runs_request_by_request_to_the_size_the_local_steps_finish(v3, tmp_path):
    base_url, seen = v3
    (tmp_path / "input.png").write_bytes(encode(pattern(64, 48)))
    entries = snippets_for(CHAINED, Translator(M), base_url)
    first, second, local = entries
    sizes = []
    for entry in (first, second):  # each request's input.png is the previous one's result
        (url,) = (await run("python", entry["code"]["python"], tmp_path))[0].split()
        png = await download(url)
        sizes.append(decode(png).size)
        (tmp_path / "input.png").write_bytes(png)
    assert sizes == [(256, 192), (1024, 768)]
    assert local["items"][-1] == "upscaler_1 'R-ESRGAN 4x+ Anime6B': LANCZOS resize to 512x384, locally"
    assert [call["body"]["request"]["scale_factor"] for call in seen if call["method"] == "POST"] == [4, 4]


@pytest.mark.parametrize("language", list(RUNNERS))
@pytest.mark.parametrize("fault, says", [
    ({"api_keys": ["another-key"]}, ["403", "INVALID_API_KEY"]),  # V3's error body, as V3 sent it
    ({"fail_rate": 1.0, "fail_reason": "no GPU left"}, ["task failed", "no GPU left"]),
])
async def test__snippets__end_with_v3s_reason_when_v3_refuses_or_the_task_fails(
        language, fault, says, aiohttp_server, tmp_path):
    if (missing := RUNNERS[language][2]()) is not None:
        skip_or_fail(missing)
    server = await aiohttp_server(create_emulator_app(EmulatorSettings(queue_delay=0, process_delay=0, **fault)))
    (tmp_path / "input.png").write_bytes(encode(pattern(64, 48)))
    (entry,) = requests_of(snippets_for(DIRECT, Translator(M), str(server.make_url(""))))
    _, err = await run(language, entry["code"][language], tmp_path, ok=False)
    assert all(word in err for word in says), err


@pytest.mark.skipif(shutil.which("go") is None, reason=NO_GO)
def test__snippets__the_go_code_compiles(tmp_path):
    for n, entry in enumerate(requests_of(snippets_for(BLENDED, Translator(M), BASE))):
        folder = tmp_path / f"request{n}"
        folder.mkdir()
        (folder / "main.go").write_text(entry["code"]["go"])
        env = {**os.environ, "GOCACHE": str(tmp_path / "gocache"), "GOTOOLCHAIN": "local", "GOFLAGS": ""}
        done = subprocess.run(["go", "vet", "main.go"], cwd=folder, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        done = subprocess.run(["go", "build", "-o", "upscale", "main.go"], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr


# --- the notice ------------------------------------------------------------------------------------

NOW = datetime(2027, 1, 15, tzinfo=UTC)  # sunsets fall at midnight, as dates do
GUIDE = "https://proxy.example/_proxy/guide"
PAGE = "https://proxy.example/_proxy/dashboard/clients/3f2a9c1d0b7e4a66"
FEATURE_HELP = {  # as view.client() writes them, from the registry
    "crop": {"name": "crop", "summary": "`upscaling_crop` in mode 1: the scaled image pasted centred on a black w x h "
                                        "canvas, so the result is exactly the size asked for.",
             "verdict": "lacking", "v3": "no crop: crop the centre of the result locally",
             "decisions": {"emulate": 40}},
    "upscaler_2": {"name": "upscaler_2", "summary": "A second upscaler blended in.", "verdict": "lacking",
                   "v3": "no blend: run a second V3 job and blend the two results locally",
                   "decisions": {"emulate": 12}},
    "model": {"name": "model", "summary": "Upscalers V3 has no model for.", "verdict": "change",
              "v3": "model_name: the nearest of RealESRGAN_x4plus_anime_6B, RealESRNet_x4plus, 4x-UltraSharp",
              "decisions": {"approximate": 52}},
}


def client_dict(readiness: str, deadline: str, *, label: str = "photo-app backend", sunset_in: int | None = 45,
                features: tuple[str, ...] = ()) -> dict:
    """A dict shaped as view.client() returns it (with the sunset, which it lacks: see notice)."""
    sunset = NOW + timedelta(days=sunset_in) if sunset_in is not None else None
    days_left = None if sunset is None else int((sunset - NOW).total_seconds() // 86400)
    v2 = 0 if readiness in ("migrated", "quiet") else 1234
    blocking = [f for f in features if FEATURE_HELP[f]["verdict"] == "lacking"]
    return {
        "client": "3f2a9c1d0b7e4a66", "label": label, "readiness": readiness, "deadline": deadline,
        "days_left": days_left, "blocking": blocking, "v2_calls": v2, "v3_calls": 56, "v3_share": 0.043,
        "v3_jobs": 1300, "first_seen": "2026-10-01T08:00:00Z", "last_seen": "2027-01-14T11:00:00Z",
        "last_v2": "2027-01-14T11:00:00Z" if v2 else "2026-11-20T09:30:00Z", "last_v3": "2027-01-14T10:00:00Z",
        "endpoints": {"upscale": v2}, "v2_codes": {"0": v2}, "v3_calls_by_status": {"200": 56},
        "features": {f: FEATURE_HELP[f]["decisions"] for f in features}, "user_agents": {"python-requests/2.31": v2},
        "fields": {}, "days": 30, "daily": {"days": [], "v2": [], "v3": []}, "shapes": [],
        "feature_help": [FEATURE_HELP[f] for f in features],
        "sunset": sunset.isoformat() if sunset else None,
    }


@pytest.mark.parametrize("readiness, deadline, sunset_in, says", [
    ("blocked", "overdue", -3, "V2's sunset date, 2027-01-12, passed 3 days ago"),
    ("blocked", "due soon", 10, "V2's sunset date is 2027-01-25: 10 days left."),
    ("ready", "on track", 45, "V2's sunset date is 2027-03-01: 45 days left."),
    ("ready", "no sunset", None, "No sunset date is set for V2 yet."),
    ("ready", "due soon", 1, "V2's sunset date is 2027-01-16: 1 day left."),
    ("ready", "due soon", 0, "V2's sunset date is 2027-01-15: less than a day left."),
])
def test__notice__for_a_client_on_v2_names_the_deadline_the_figures_and_what_blocks_it(
        readiness, deadline, sunset_in, says):
    features = ("crop", "upscaler_2", "model") if readiness == "blocked" else ("model",)
    client = client_dict(readiness, deadline, sunset_in=sunset_in, features=features)
    text = notice(client, guide_url=GUIDE, dashboard_url=PAGE)
    assert says in text
    subject = text.splitlines()[0]
    assert subject.startswith("Subject: photo-app backend (key fingerprint 3f2a9c1d0b7e4a66): move from the V2")
    assert subject.endswith(f" by {(NOW + timedelta(days=sunset_in)):%Y-%m-%d}" if sunset_in is not None else "to V3")
    assert "1,234 calls to the deprecated V2 upscale API" in text and "56 calls to V3" in text
    assert "In the last 30 days" in text and "Last V2 call: 2027-01-14 11:00:00 UTC" in text
    assert "send POST /v3/async/upscale instead of POST /v2/upscale" in text
    assert f"Migration guide: {GUIDE}" in text and PAGE in text
    assert "- SubstituteNearestModel (upscaler_1, upscaler_2): Upscalers V3 has no model for. In V3: model_name" in text
    if readiness == "blocked":
        assert "It uses V2 features V3 lacks (CropToCentre, BlendSecondUpscaler)" in text
        assert "- CropToCentre (upscaling_crop), V3 lacks it: `upscaling_crop` in mode 1" in text
        assert ("- BlendSecondUpscaler (upscaler_2, extras_upscaler_2_visibility), V3 lacks it: A second upscaler "
                "blended in. In V3: no blend: run a second V3 job and blend the two results locally.") in text
        assert "SubstituteNearestModel (upscaler_1, upscaler_2), V3 lacks it" not in text
    else:
        assert "Every V2 feature it uses has a way in V3." in text and "V3 lacks" not in text


@pytest.mark.parametrize("readiness, sunset_in, says", [
    ("migrated", 45, "It calls V3 and no longer calls V2: nothing to change."),
    ("migrated", None, "It calls V3 and no longer calls V2: nothing to change."),
    ("quiet", 45, "If it still runs, it must use V3 (POST /v3/async/upscale, then "
                  "GET /v3/async/task-result?task_id=...) before 2027-03-01."),
    ("quiet", None, "before V2 is switched off."),
])
def test__notice__for_a_client_off_v2_says_so_with_its_last_calls(readiness, sunset_in, says):
    client = client_dict(readiness, "done", sunset_in=sunset_in, label="")
    text = notice(client, guide_url=GUIDE)
    assert says in text
    assert text.startswith("Subject: key fingerprint 3f2a9c1d0b7e4a66: ")
    assert "0 calls to the deprecated V2 upscale API" in text and "Last V2 call: 2026-11-20 09:30:00 UTC" in text
    assert "Last call to either API: 2027-01-14 11:00:00 UTC" in text and f"Migration guide: {GUIDE}" in text
    assert "What to change" not in text and "dashboard" not in text


def test__notice__names_clients_by_fingerprint_only_and_a_keyless_one_as_what_it_is():
    # a key a client put where it doesn't belong (its user agent, say) stays out of the notice
    client = {**client_dict("ready", "on track"), "client": "unidentified", "label": "",
              "user_agents": {f"my-app/1 key={KEY}": 3}, "shapes": [{"shape": KEY, "calls": 3}]}
    text = notice(client, guide_url=GUIDE)
    assert "Client: calls without an API key (unidentified)." in text
    assert KEY not in text and "Bearer" not in text


async def test__notice_and_snippets__read_what_view_client_returns_from_a_real_store(tmp_path):
    """The dict comes from the usage store as the dashboard reads it, its shape from shape_of."""
    store = SqliteUsageStore(tmp_path / "usage.sqlite3")
    now = NOW.timestamp()
    tallies = Tallies(lambda: now)
    crop = {"upscaler_1": "R-ESRGAN 4x+", "resize_mode": 1, "upscaling_resize_w": 100, "upscaling_resize_h": 60,
            "upscaling_crop": True}
    for _ in range(3):
        tallies.v2_call("3f2a9c1d0b7e4a66", "upscale", 0, "sdk/1", {"scale_to": "emulate", "crop": "emulate"},
                        jobs=1, shape=shape(crop))
    await store.add(tallies.take(), retention=400 * 86400)
    sunset = NOW + timedelta(days=20)
    doc = await view.client(store, Context(now, 30, sunset), "3f2a9c1d0b7e4a66")
    await store.close()
    assert doc["readiness"] == "blocked" and doc["blocking"] == ["scale_to", "crop"]
    text = notice({**doc, "sunset": sunset.isoformat()}, guide_url=GUIDE)
    assert "move from the V2 upscale API to V3 by 2027-02-04" in text and "20 days left" in text
    assert "3 calls to the deprecated V2 upscale API" in text
    assert "It uses V2 features V3 lacks (ScaleToExactSize, CropToCentre)" in text
    entries = snippets_for(doc["shapes"][0]["shape"], Translator(M), BASE)
    assert [e["kind"] for e in entries] == ["request", "local", "warnings"]
    assert entries[1]["output"] == {"width": 100, "height": 60}
