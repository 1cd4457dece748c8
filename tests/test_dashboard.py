"""The migration dashboard as an operator uses it: a real proxy on loopback in front of the V3
emulator, real V2 and /v3 calls from several clients (on top of a month of history counted through
the same tallies, with an injected clock), then Debian's chromium through selenium: the login form,
every page, the charts drawn, filters and sorting, the label form; and over HTTP, the JSON and CSV
of the same filters, the admin API, refusals (401 or the login form) and their audit lines.

Chromium and chromedriver: skipped where they are missing, failed under CI=true (`make test`
installs them on Debian when it runs as root). Screenshots of each page go to the test's tmp dir
(and to $DASHBOARD_SCREENSHOTS when set, for the README's)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from aiohttp import web

from proxy.app import create_app
from proxy.dashboard import auth
from proxy.dashboard.api import count_clients
from proxy.emulator import EMULATOR, LEGACY_V2, EmulatorSettings, LegacySettings, create_emulator_app, create_legacy_app
from proxy.fingerprint import fingerprint
from proxy.keys import METRICS, USAGE
from proxy.keys import SECRET as FINGERPRINT_SECRET
from proxy.settings import Settings
from proxy.usage.stores import SqliteUsageStore
from proxy.usage.tally import Tallies
from tests.images import b64

TOKEN = "dashboard-tests-admin-token-0123456789"
SECRET = "dashboard-tests-fingerprint-secret"
DAY = 86400
# client -> (key, user agent); each one a different kind of client
CLIENTS = {
    "alpha": ("sk-alpha-0123456789abcdef", "novita-client/0.4.12 python-requests/2.31.0"),
    "bravo": ("sk-bravo-0123456789abcdef", "curl/8.5.0"),
    "charlie": ("sk-charlie-0123456789abcdef", "PhotoApp/3.2 (Android 14)"),
    "delta": ("sk-delta-0123456789abcdef", "ImageBatch/1.4 node-fetch/3.3"),
    "echo": ("sk-echo-0123456789abcdef", "ImageBatch/2.0 (V3)"),
}
FP = {name: fingerprint(key, SECRET.encode()) for name, (key, _) in CLIENTS.items()}
BEARER = {"Authorization": f"Bearer {TOKEN}"}
DIRECT = {"upscaler_1": "R-ESRGAN 4x+ Anime6B", "resize_mode": 0, "upscaling_resize": 2}
COMPOSED = {"upscaler_1": "R-ESRGAN 4x+ Anime6B", "resize_mode": 1, "upscaling_resize_w": 100,
            "upscaling_resize_h": 80, "upscaling_crop": True}
FACES = {**DIRECT, "gfpgan_visibility": 0.5}  # refused: this proxy's face policy is strict


def chromium_binaries() -> tuple[str, str]:
    """Debian's chromium and its chromedriver; skips the test (fails it under CI=true) without them."""
    browser = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if os.path.exists(browser) and os.path.exists(driver):
        return browser, driver
    why = ("chromium and chromium-driver are not installed (Debian: apt-get install chromium chromium-driver; "
           "`make test` does it as root)")
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


# --- a real proxy, in a thread of its own: selenium's calls block -------------------------------------

class LiveProxy:
    """The V3 emulator and the proxy on loopback ports, served by an event loop in a thread; with
    `legacy`, the legacy V2 emulator too, as the proxy's V2 upstream. Their states (`v3`, `v2`) are
    there for a test to change their settings at run time."""

    def __init__(self, data_dir: Path, legacy: bool = False, **overrides) -> None:
        self.data_dir, self.legacy, self.overrides = data_dir, legacy, overrides
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="live proxy", daemon=True)
        self.runners: list[web.AppRunner] = []

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(60)

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _serve(self, app: web.Application) -> int:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.runners.append(runner)
        return runner.addresses[0][1]

    async def _start(self) -> None:
        v3_app = create_emulator_app(EmulatorSettings(queue_delay=0.05, process_delay=0.05))
        emulator = await self._serve(v3_app)
        self.v3 = v3_app[EMULATOR]
        if self.legacy:
            v2_app = create_legacy_app(LegacySettings(queue_delay=0.05, process_delay=0.05))
            v2 = await self._serve(v2_app)
            self.v2 = v2_app[LEGACY_V2]
            self.overrides = {"v2_upstream": f"http://127.0.0.1:{v2}",
                              "image_hosts": [f"127.0.0.1:{emulator}", f"127.0.0.1:{v2}"], **self.overrides}
        settings = Settings(**{
            "upstream": f"http://127.0.0.1:{emulator}", "data_dir": self.data_dir, "poll_cache_seconds": 0,
            "admin_token": TOKEN, "fingerprint_secret": SECRET, "policy_face": "strict",
            "sunset_date": datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=75),
            "brownouts": json.dumps([{"start": _iso(time.time() + 40 * DAY), "end": _iso(time.time() + 42 * DAY),
                                      "fraction": 0.5}]),
            "client_labels": json.dumps({FP["alpha"]: "Billing exports"}), **self.overrides})
        self.app = create_app(settings)
        self.url = f"http://127.0.0.1:{await self._serve(self.app)}"

    def stop(self) -> None:
        async def cleanup() -> None:
            for runner in reversed(self.runners):
                await runner.cleanup()

        self.run(cleanup(), 60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def seed_history(data_dir: Path, now: float) -> None:
    """A month of traffic before today, counted as the edge counts it (Tallies, its clock injected)
    and flushed into the SQLite store the proxy will open: V2 falling off, /v3 growing."""
    clock = [now]
    tallies = Tallies(lambda: clock[0])
    ua = {name: agent for name, (_, agent) in CLIENTS.items()}
    for ago in range(45, 0, -1):
        t = now - ago * DAY
        for name, v2, v3, features in (
            ("alpha", 20 + ago // 2, 0, {}),
            ("bravo", 6 + ago // 3, 0, {"scale_to": "emulate", "crop": "emulate"}),
            ("charlie", 6, 0, {"face": "refused"}),
            ("delta", 3 + ago // 2, max(0, 26 - ago), {"model": "approximate"}),
            ("echo", 12 if ago > 32 else 0, 8 if ago <= 32 else 0, {}),
        ):
            for i in range(max(v2, 0)):
                clock[0] = t + i * 60
                tallies.v2_call(FP[name], "upscale", 10 if features.get("face") == "refused" else 0, ua[name],
                                features, jobs=1)
            for i in range(max(v3, 0)):
                clock[0] = t + i * 60
                tallies.v3_call(FP[name], "POST", 200)

    async def flush() -> None:
        store = SqliteUsageStore(data_dir / "usage.sqlite3")
        await store.add(tallies.take(), 400 * DAY)
        await store.close()

    data_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(flush())


def make_calls(base: str) -> None:
    """Real calls: a direct body, a composed one (resize_mode 1 and a crop), a strict-policy
    refusal, a call without a key, and /v3 pass-through calls from two clients."""
    http = requests.Session()

    def v2(name: str | None, body: dict) -> dict:
        headers = {"Authorization": f"Bearer {CLIENTS[name][0]}", "User-Agent": CLIENTS[name][1]} if name else {}
        reply = http.post(f"{base}/v2/upscale", json={**body, "image": b64()}, headers=headers, timeout=30).json()
        if reply["code"] == 0:
            for _ in range(400):
                done = http.get(f"{base}/v2/progress", params={"task_id": reply["data"]["task_id"]},
                                headers=headers, timeout=30).json()
                assert done["code"] == 0, done
                if done["data"]["status"] in (2, 3):
                    assert done["data"]["status"] == 2, done
                    break
                time.sleep(0.02)
        return reply

    def v3(name: str) -> None:
        headers = {"Authorization": f"Bearer {CLIENTS[name][0]}", "User-Agent": CLIENTS[name][1]}
        body = {"extra": {}, "request": {"model_name": "RealESRNet_x4plus", "image_base64": b64(), "scale_factor": 2}}
        resp = http.post(f"{base}/v3/async/upscale", json=body, headers=headers, timeout=30)
        assert resp.status_code == 200, resp.text
        got = http.get(f"{base}/v3/async/task-result", params={"task_id": resp.json()["task_id"]}, headers=headers,
                       timeout=30)
        assert got.status_code == 200, got.text

    assert v2("alpha", DIRECT)["code"] == 0
    assert v2("bravo", COMPOSED)["code"] == 0
    refused = v2("charlie", FACES)
    assert refused["code"] == 10 and "strict" in refused["msg"], refused
    assert v2("delta", DIRECT)["code"] == 0
    assert v2(None, DIRECT)["code"] == 4  # no key: the "unidentified" client
    v3("delta")
    v3("echo")


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[LiveProxy]:
    data = tmp_path_factory.mktemp("dashboard") / "data"
    seed_history(data, time.time())
    proxy = LiveProxy(data)
    proxy.start()
    try:
        make_calls(proxy.url)
        wait_for(lambda: metric(proxy.url, "upscale_proxy_usage_flush_lag_seconds") == 0.0, "the usage flush")
        yield proxy
    finally:
        proxy.stop()


def wait_for(condition, what: str, timeout: float = 15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := condition():
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def metric(base: str, name: str, labels: str = "") -> float | None:
    text = requests.get(f"{base}/metrics", timeout=10).text
    found = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(found[1]) if found else None


def usage(base: str, query: str = "", **kw) -> requests.Response:
    return requests.get(f"{base}/_proxy/usage{query}", headers=kw.pop("headers", BEARER), timeout=10, **kw)


# --- the browser ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary, driver_path = chromium_binaries()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--window-size=1280,1000", "--force-device-scale-factor=1",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


def screenshot(driver, shots: Path, name: str, element: str | None = None) -> Path:
    """The whole page (or the element of this CSS selector): the window as tall as the page, for the shot."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(max(height, 600), 4000))
    path = shots / f"{name}.png"
    if element is None:
        driver.save_screenshot(str(path))
    else:
        from selenium.webdriver.common.by import By

        driver.find_element(By.CSS_SELECTOR, element).screenshot(str(path))
    driver.set_window_size(1280, 1000)
    if extra := os.environ.get("DASHBOARD_SCREENSHOTS"):
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / path.name)
    return path


def console_errors(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


# the series' colours (dashboard.js): V2 orange, /v3 green; the sunset and brownouts red
COLOURS = {"v2": (232, 89, 12), "v3": (47, 158, 68), "sunset": (201, 42, 42)}
_PIXELS = """
const canvas = document.querySelector(arguments[0] + ' canvas');
if (!canvas) return null;
const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
const near = (i, c) => Math.abs(data[i] - c[0]) < 40 && Math.abs(data[i + 1] - c[1]) < 40 && Math.abs(data[i + 2] - c[2]) < 40;
const counts = {};
for (const [name, c] of Object.entries(arguments[1])) {
  let n = 0;
  for (let i = 0; i < data.length; i += 4) if (data[i + 3] > 200 && near(i, c)) n++;
  counts[name] = n;
}
return {width: canvas.width, height: canvas.height, counts: counts};
"""


def chart_pixels(driver, selector: str) -> dict:
    drawn = driver.execute_script(_PIXELS, selector, COLOURS)
    assert drawn is not None, f"no chart canvas in {selector}"
    assert drawn["width"] > 300 and drawn["height"] > 150, drawn
    return drawn["counts"]


def log_in(driver, base: str) -> None:
    from selenium.webdriver.common.by import By

    driver.delete_all_cookies()
    driver.get(f"{base}/_proxy/dashboard/clients?days=30")
    assert urlsplit(driver.current_url).path == "/_proxy/login"
    assert parse_qs(urlsplit(driver.current_url).query)["next"] == ["/_proxy/dashboard/clients?days=30"]
    driver.find_element(By.NAME, "token").send_keys(TOKEN)
    driver.find_element(By.CSS_SELECTOR, "form.login button").click()
    wait_for(lambda: urlsplit(driver.current_url).path == "/_proxy/dashboard/clients", "the page after login")


def rows(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [tr.get_attribute("data-client") for tr in driver.find_elements(By.CSS_SELECTOR, "#clients tbody tr[data-client]")]


# --- tests ---------------------------------------------------------------------------------------------

def test__pages__render_for_an_operator_logged_in_through_the_form(live, browser, shots, log_lines):
    from selenium.webdriver.common.by import By

    browser.delete_all_cookies()
    browser.get(f"{live.url}/_proxy/login")
    screenshot(browser, shots, "login")
    log_in(browser, live.url)
    cookie = browser.get_cookie(auth.COOKIE)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and TOKEN not in cookie["value"]
    assert {"admin.login"} <= {line["event"] for line in log_lines}

    browser.get(f"{live.url}/_proxy/dashboard")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Who still calls V2"
    tiles = {t.get_attribute("class").split()[1]: int(t.find_element(By.CLASS_NAME, "count").text)
             for t in browser.find_elements(By.CSS_SELECTOR, ".tiles .tile")}
    # alpha, delta, unidentified: ready; bravo (crop, exact size), charlie (faces): blocked; echo: migrated
    assert tiles == {"blocked": 2, "ready": 3, "migrated": 1, "quiet": 0}
    calls = chart_pixels(browser, "#calls-per-day")
    assert calls["v2"] > 200 and calls["v3"] > 100, calls
    burn = chart_pixels(browser, "#burn-down")
    assert burn["v2"] > 100 and burn["sunset"] > 50, burn  # the sunset line and the brownout band
    screenshot(browser, shots, "overview")
    assert browser.find_elements(By.ID, "migration") == []  # no legacy V2: no stages (test_migration_dashboard.py)
    browser.find_element(By.CSS_SELECTOR, ".tile.blocked").click()
    assert sorted(rows(browser)) == sorted([FP["bravo"], FP["charlie"]])

    browser.get(f"{live.url}/_proxy/dashboard/clients")
    assert rows(browser)[0] == FP["alpha"]  # the busiest first
    assert "Billing exports" in browser.find_element(By.ID, "clients").text
    assert "no client has a stage" in browser.find_element(By.CSS_SELECTOR, "p.summary").text
    screenshot(browser, shots, "clients")

    browser.get(f"{live.url}/_proxy/dashboard/clients/{FP['bravo']}")
    assert {"CropToCentre", "ScaleToExactSize"} <= {c.text for c in browser.find_elements(By.CSS_SELECTOR, "#features code")}
    assert browser.find_element(By.LINK_TEXT, "the migration guide").get_attribute("href").endswith("/_proxy/guide")
    client = chart_pixels(browser, "#client-calls")
    assert client["v2"] > 100, client
    assert "none: no legacy V2 is configured" in browser.find_element(By.CSS_SELECTOR, "section.facts").text
    assert browser.find_elements(By.ID, "stage") == []
    screenshot(browser, shots, "client")

    browser.get(f"{live.url}/_proxy/dashboard/features")
    ranked = [tr.get_attribute("data-feature") for tr in browser.find_elements(By.CSS_SELECTOR, "#features tbody tr")]
    assert ranked[:3] == ["crop", "face", "scale_to"]  # one client blocked each, then by name
    screenshot(browser, shots, "features")

    page = browser.page_source
    for key, _ in CLIENTS.values():  # a page shows fingerprints and labels, never a key
        assert key not in page
    assert console_errors(browser) == []


def test__client_page__shows_the_v3_request_translate_gives_for_its_body(live, browser, shots):
    from selenium.webdriver.common.by import By

    log_in(browser, live.url)
    browser.get(f"{live.url}/_proxy/dashboard/clients/{FP['bravo']}")
    shown = [json.loads(pre.text) for pre in browser.find_elements(By.CSS_SELECTOR, "#snippets pre.v3-request")]
    preview = requests.post(f"{live.url}/_proxy/translate", json={**COMPOSED, "image": b64()}, timeout=10).json()
    assert preview["code"] == 0, preview
    expected = preview["data"]["v3_requests"]
    assert len(shown) == len(expected) >= 1

    def without_image(request: dict) -> dict:
        return {**request, "request": {k: v for k, v in request["request"].items() if k != "image_base64"}}

    assert [without_image(r) for r in shown] == [without_image(r) for r in expected]
    curl = browser.find_element(By.CSS_SELECTOR, "#snippets pre.code.curl").text
    assert f"BASE_URL={live.url}" in curl and "/v3/async/upscale" in curl  # through this proxy's /v3
    notice = browser.find_element(By.ID, "notice").get_attribute("value")
    assert FP["bravo"] in notice and "CropToCentre" in notice and CLIENTS["bravo"][0] not in notice
    screenshot(browser, shots, "client-snippets")
    assert console_errors(browser) == []


def test__clients_table__filters_search_and_sorting_change_the_rows(live, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    log_in(browser, live.url)
    Select(browser.find_element(By.NAME, "readiness")).select_by_value("migrated")
    browser.find_element(By.CSS_SELECTOR, "form.filters button").click()
    wait_for(lambda: "readiness=migrated" in browser.current_url, "the filtered URL")
    assert rows(browser) == [FP["echo"]]

    Select(browser.find_element(By.NAME, "readiness")).select_by_value("")
    search = browser.find_element(By.NAME, "q")
    search.clear()
    search.send_keys("billing")  # a label, any case
    browser.find_element(By.CSS_SELECTOR, "form.filters button").click()
    wait_for(lambda: "q=billing" in browser.current_url, "the search URL")
    assert rows(browser) == [FP["alpha"]]

    browser.get(f"{live.url}/_proxy/dashboard/clients?days=30")
    browser.find_element(By.LINK_TEXT, "V3 share").click()
    wait_for(lambda: "sort=v3_share" in browser.current_url, "the sorted URL")
    assert rows(browser)[0] == FP["echo"]  # all of its calls on /v3
    browser.find_element(By.PARTIAL_LINK_TEXT, "V3 share").click()  # again: the other way round
    wait_for(lambda: "order=asc" in browser.current_url, "the reversed URL")
    assert rows(browser)[-1] == FP["echo"]
    assert console_errors(browser) == []


def test__csv__is_the_json_row_by_row_for_the_same_filters(live):
    for query in ("?days=30", "?days=90&sort=client", "?readiness=blocked", "?q=bill", "?days=1&order=asc"):
        doc = usage(live.url, query)
        assert doc.status_code == 200 and doc.headers["Cache-Control"] == "no-store"
        table = usage(live.url, query + "&format=csv")
        assert table.status_code == 200 and table.headers["Content-Type"] == "text/csv; charset=utf-8"
        days = doc.json()["days"]
        assert re.fullmatch(rf'attachment; filename="v2-usage-{days}d-\d{{4}}-\d\d-\d\d.csv"',
                            table.headers["Content-Disposition"])
        parsed = list(csv.DictReader(io.StringIO(table.text)))
        json_rows = doc.json()["clients"]
        assert [r["client"] for r in parsed] == [r["client"] for r in json_rows]
        for line, row in zip(parsed, json_rows, strict=True):
            assert line["label"] == row["label"] and line["readiness"] == row["readiness"]
            assert int(line["v2_calls"]) == row["v2_calls"] and int(line["v3_calls"]) == row["v3_calls"]
            assert float(line["v3_share"]) == row["v3_share"] and line["last_seen"] == row["last_seen"]
            assert line["features"].split() == list(row["features"])
    one = requests.get(f"{live.url}/_proxy/usage/clients/{FP['delta']}", headers=BEARER, timeout=10).json()
    assert one["v3_calls"] > 0 and 0 < one["v3_share"] < 1 and one["shapes"]  # its real call's body shape


def test__bad_filters__are_400_naming_the_parameter(live):
    for query, parameter in (("?days=0", "days"), ("?days=x", "days"), ("?readiness=done", "readiness"),
                             ("?sort=key", "sort"), ("?order=up", "order"), ("?format=xml", "format")):
        resp = usage(live.url, query)
        assert resp.status_code == 400 and resp.json()["parameter"] == parameter, (query, resp.text)
    page = requests.get(f"{live.url}/_proxy/dashboard?days=0", headers=BEARER, timeout=10)
    assert page.status_code == 400 and "days: from 1 to 3660" in page.text
    assert requests.get(f"{live.url}/_proxy/usage/clients/nope", headers=BEARER, timeout=10).status_code == 404


def test__a_wrong_token__is_refused_and_audited(live, log_lines):
    wrong = {"Authorization": "Bearer not-the-admin-token-at-all"}
    for path in ("/_proxy/usage", "/_proxy/usage?format=csv", f"/_proxy/usage/clients/{FP['alpha']}"):
        resp = requests.get(live.url + path, headers=wrong, timeout=10)
        assert resp.status_code == 401 and resp.json()["error"] == "unauthorized"
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    put = requests.put(f"{live.url}/_proxy/clients/{FP['alpha']}/label", json={"label": "x"}, headers=wrong, timeout=10)
    assert put.status_code == 401
    for path in ("/_proxy/dashboard", "/_proxy/dashboard/features?days=7"):
        page = requests.get(live.url + path, headers=wrong, timeout=10, allow_redirects=False)
        assert page.status_code == 303 and page.headers["Location"].startswith("/_proxy/login?next=")
    by_url = requests.get(f"{live.url}/_proxy/dashboard/clients?days=7&token=wrong-token-0123456789", timeout=10,
                          allow_redirects=False)
    assert by_url.status_code == 303 and "token" not in parse_qs(urlsplit(by_url.headers["Location"]).query)["next"][0]
    form = requests.post(f"{live.url}/_proxy/login", data={"token": "wrong-token-0123456789", "next": "/_proxy/dashboard"},
                         timeout=10, allow_redirects=False)
    assert form.status_code == 401 and auth.COOKIE not in form.cookies and "not the admin token" in form.text
    forged = requests.get(f"{live.url}/_proxy/usage", cookies={auth.COOKIE: f"{int(time.time())}.{'0' * 64}"}, timeout=10)
    assert forged.status_code == 401

    refused = [line for line in log_lines if line["event"] == "admin.refused"]
    assert len(refused) == 9
    assert {line["path"] for line in refused} >= {"/_proxy/usage", "/_proxy/dashboard", "/_proxy/login"}
    assert all(line["client"] == "127.0.0.1" and line["level"] == "warning" for line in refused)
    assert "wrong-token" not in log_lines.text and "not-the-admin-token" not in log_lines.text


def test__token_in_the_url__logs_in_and_leaves_the_address(live):
    http = requests.Session()
    first = http.get(f"{live.url}/_proxy/dashboard/clients?days=7&token={TOKEN}", timeout=10, allow_redirects=False)
    assert first.status_code == 303 and first.headers["Location"] == "/_proxy/dashboard/clients?days=7"
    assert first.headers["Referrer-Policy"] == "no-referrer"
    cookie = first.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie and TOKEN not in cookie
    page = http.get(live.url + first.headers["Location"], timeout=10, allow_redirects=False)
    assert page.status_code == 200 and "Content-Security-Policy" in page.headers
    assert http.get(f"{live.url}/_proxy/usage", timeout=10).status_code == 200  # the page's JSON link works
    # but the admin API's PUT takes the Bearer token only
    assert http.put(f"{live.url}/_proxy/clients/{FP['echo']}/label", json={"label": "x"}, timeout=10).status_code == 401
    out = http.post(f"{live.url}/_proxy/logout", timeout=10, allow_redirects=False)
    assert out.status_code == 303 and out.headers["Location"] == "/_proxy/login"
    assert http.get(f"{live.url}/_proxy/dashboard", timeout=10, allow_redirects=False).status_code == 303


def test__labels__set_by_the_page_form_and_the_admin_api(live, browser, log_lines):
    from selenium.webdriver.common.by import By

    log_in(browser, live.url)
    browser.get(f"{live.url}/_proxy/dashboard/clients/{FP['charlie']}")
    field = browser.find_element(By.ID, "label")
    field.clear()
    field.send_keys("Photo app <Android>")
    field.submit()
    wait_for(lambda: "saved=1" in browser.current_url, "the saved page")
    assert browser.find_element(By.TAG_NAME, "h1").text.startswith("Photo app <Android>")  # escaped, shown as text
    assert console_errors(browser) == []

    row = next(r for r in usage(live.url, "?q=photo").json()["clients"])
    assert (row["client"], row["label"]) == (FP["charlie"], "Photo app <Android>")
    # without the page's CSRF token, the session alone changes nothing
    session = {auth.COOKIE: browser.get_cookie(auth.COOKIE)["value"]}
    forged = requests.post(f"{live.url}/_proxy/dashboard/clients/{FP['charlie']}/label", data={"label": "pwned"},
                           cookies=session, timeout=10, allow_redirects=False)
    assert forged.status_code == 403

    put = requests.put(f"{live.url}/_proxy/clients/{FP['delta']}/label", json={"label": "  Batch jobs "},
                       headers=BEARER, timeout=10)
    assert put.status_code == 200 and put.json() == {"client": FP["delta"], "label": "Batch jobs"}
    assert usage(live.url, "?q=batch").json()["clients"][0]["client"] == FP["delta"]
    cleared = requests.put(f"{live.url}/_proxy/clients/{FP['delta']}/label", json={"label": None}, headers=BEARER,
                           timeout=10)
    assert cleared.status_code == 200 and usage(live.url, "?q=batch").json()["clients"] == []
    for name, body, parameter in ((FP["delta"], {"label": "x" * 81}, "label"), ("sk-not-a-fingerprint", {"label": "x"}, "fingerprint"),
                                  (FP["delta"], {"label": 3}, "label"), ("unidentified", {"label": "a\nb"}, "label")):
        bad = requests.put(f"{live.url}/_proxy/clients/{name}/label", json=body, headers=BEARER, timeout=10)
        assert bad.status_code == 400 and bad.json()["parameter"] == parameter, bad.text
    assert requests.put(f"{live.url}/_proxy/clients/unidentified/label", json={"label": "No key"}, headers=BEARER,
                        timeout=10).status_code == 200

    changes = [line for line in log_lines if line["event"] == "admin.label_set"]
    assert [(c["fingerprint"], c["label"], c["via"]) for c in changes] == [
        (FP["charlie"], "Photo app <Android>", "dashboard form"), (FP["delta"], "Batch jobs", "bearer"),
        (FP["delta"], None, "bearer"), ("unidentified", "No key", "bearer")]
    assert all(c["client"] == "127.0.0.1" for c in changes) and TOKEN not in log_lines.text


def test__metrics__count_clients_by_readiness_and_the_usage_flush(live):
    live.run(count_clients(live.app))  # what the app does every minute
    counts = {state: metric(live.url, "upscale_proxy_clients", f'{{readiness="{state}"}}')
              for state in ("blocked", "ready", "migrated", "quiet")}
    assert counts == {"blocked": 2.0, "ready": 3.0, "migrated": 1.0, "quiet": 0.0}
    assert metric(live.url, "upscale_proxy_usage_flush_errors") == 0.0
    assert live.app[USAGE].flush_errors == 0 and METRICS in live.app


def test__serve_workers__share_the_token_made_at_start(tmp_path):
    """Unset, the token is made once by the parent, announced in one line, and every worker takes it."""
    env = {k: v for k, v in os.environ.items() if k != "UPSCALE_PROXY_ADMIN_TOKEN"}
    env.update(UPSCALE_PROXY_DATA_DIR=str(tmp_path), UPSCALE_PROXY_DRAIN_DELAY="0")
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--workers", "2", "--port", "0",
                                 "--upstream", "http://127.0.0.1:9", "--log-format", "json"],
                                stdout=out, stderr=subprocess.DEVNULL, env=env)

        def lines() -> list[dict]:
            out.seek(0)
            return [json.loads(line) for line in out.read().decode().splitlines() if line.startswith("{")]

        try:
            announced = wait_for(lambda: [line for line in lines() if line["event"].startswith("dashboard at ")],
                                 "the dashboard's URL", 30)
            wait_for(lambda: len([line for line in lines() if line["event"] == "proxy listening"]) == 2, "two workers", 30)
            url = announced[0]["event"].removeprefix("dashboard at ")
            assert announced[0]["level"] == "warning" and re.fullmatch(
                r"http://127\.0\.0\.1:\d+/_proxy/dashboard\?token=[\w-]{43}", url), url
            token = parse_qs(urlsplit(url).query)["token"][0]
            base = url.split("/_proxy/")[0]
            for _ in range(20):  # a new connection each: the kernel spreads them over both workers
                assert requests.get(f"{base}/_proxy/usage", headers={"Authorization": f"Bearer {token}"},
                                    timeout=10).status_code == 200
            assert requests.get(url, timeout=10, allow_redirects=False).status_code == 303
        finally:
            proc.terminate()
            proc.wait(30)
        assert len([line for line in lines() if token in json.dumps(line)]) == 1  # the announcing line only


async def test__replies__are_the_documented_ones(emulator, start_proxy):
    """Each route's replies, as proxy/openapi.json documents them (status, media type, headers, body)."""
    from tests.helpers import AUTH, KEY
    from tests.test_openapi import call

    server, _ = emulator
    client = await start_proxy(str(server.make_url("")), admin_token=TOKEN)
    app = client.server.app
    no_redirect = {"allow_redirects": False}
    await call(client, "GET", "/_proxy/login?next=/_proxy/dashboard")
    resp, _ = await call(client, "POST", "/_proxy/login", data={"token": "wrong-token-0123456789"})
    assert resp.status == 401
    resp, _ = await call(client, "POST", "/_proxy/login", data={"token": TOKEN}, **no_redirect)
    assert resp.status == 303 and resp.headers["Location"] == "/_proxy/dashboard"
    resp, _ = await call(client, "POST", "/_proxy/logout", **no_redirect)
    assert resp.status == 303
    client.session.cookie_jar.clear()

    resp, _ = await call(client, "GET", "/_proxy/dashboard", **no_redirect)
    assert resp.status == 303
    for path in ("/_proxy/dashboard", "/_proxy/dashboard/clients?sort=client", "/_proxy/dashboard/features?days=7"):
        resp, _ = await call(client, "GET", path, headers=BEARER)
        assert resp.status == 200 and resp.content_type == "text/html"
    resp, _ = await call(client, "GET", "/_proxy/dashboard?days=0", headers=BEARER)
    assert resp.status == 400
    resp, _ = await call(client, "GET", "/_proxy/dashboard/static/favicon.svg", "/_proxy/dashboard/static/{name}")
    assert resp.status == 200 and resp.content_type == "image/svg+xml"
    resp, _ = await call(client, "GET", "/_proxy/dashboard/static/../auth.py", "/_proxy/dashboard/static/{name}")
    assert resp.status == 404

    # a client in the store: one V2 call, flushed within a second
    async with client.get("/v2/progress?task_id=unknown", headers=AUTH) as reply:
        assert (await reply.json())["code"] == 3
    me = fingerprint(KEY, app[FINGERPRINT_SECRET])
    template = "/_proxy/usage/clients/{fingerprint}"
    for _ in range(100):
        resp, _ = await call(client, "GET", f"/_proxy/usage/clients/{me}", template, headers=BEARER)
        if resp.status == 200:
            break
        assert resp.status == 404
        await asyncio.sleep(0.05)
    assert resp.status == 200
    resp, _ = await call(client, "GET", f"/_proxy/usage/clients/{me}", template)
    assert resp.status == 401
    page = f"/_proxy/dashboard/clients/{me}"
    resp, _ = await call(client, "GET", page, "/_proxy/dashboard/clients/{fingerprint}", headers=BEARER)
    assert resp.status == 200
    resp, _ = await call(client, "GET", "/_proxy/dashboard/clients/0000000000000000",
                         "/_proxy/dashboard/clients/{fingerprint}", headers=BEARER)
    assert resp.status == 404

    for query, status in (("", 200), ("?format=csv", 200), ("?days=x", 400)):
        resp, _ = await call(client, "GET", "/_proxy/usage" + query, headers=BEARER)
        assert resp.status == status
    resp, _ = await call(client, "GET", "/_proxy/usage")
    assert resp.status == 401

    form = "/_proxy/dashboard/clients/{fingerprint}/label"
    resp, _ = await call(client, "POST", f"{page}/label", form, headers=BEARER, data={"label": "x"})
    assert resp.status == 403
    resp, _ = await call(client, "POST", f"{page}/label", form, headers=BEARER, **no_redirect,
                         data={"label": "Mine", "csrf": app[auth.ADMIN].csrf})
    assert resp.status == 303 and resp.headers["Location"] == f"{page}?saved=1"
    resp, _ = await call(client, "POST", f"{page}/label", form, headers=BEARER,
                         data={"label": "x" * 81, "csrf": app[auth.ADMIN].csrf})
    assert resp.status == 400

    put = "/_proxy/clients/{fingerprint}/label"
    for body, headers, status in (({"label": "Mine too"}, BEARER, 200), ({"label": None}, BEARER, 200),
                                  ({"nope": 1}, BEARER, 400), ({"label": "x"}, {}, 401)):
        resp, _ = await call(client, "PUT", f"/_proxy/clients/{me}/label", put, json=body, headers=headers)
        assert resp.status == status


async def test__redirects__stay_on_this_proxy_and_carry_no_header(emulator, start_proxy):
    server, _ = emulator
    client = await start_proxy(str(server.make_url("")), admin_token=TOKEN)
    for target in ("https://elsewhere.example/", "//elsewhere.example/x", "/_proxy/x\r\nSet-Cookie: a=b",
                   "/_proxy/a\\b", "/v2/upscale"):
        async with client.post("/_proxy/login", data={"token": TOKEN, "next": target}, allow_redirects=False) as resp:
            assert resp.status == 303 and resp.headers["Location"] == "/_proxy/dashboard", target
    async with client.get(f"/_proxy/dashboard/clients/%0d%0aSet-Cookie:%20a=b?token={TOKEN}&days=7",
                          allow_redirects=False) as resp:
        assert resp.status == 303 and "a=b" not in resp.cookies
        assert resp.headers["Location"].lower() == "/_proxy/dashboard/clients/%0d%0aset-cookie:%20a=b?days=7"
    client.session.cookie_jar.clear()  # logged out again
    async with client.get("/_proxy/dashboard/clients/%0d%0a", allow_redirects=False) as resp:
        assert resp.status == 303 and "\n" not in resp.headers["Location"]
    # a refused form post comes back to the overview after the login, not to a URL that only takes POST
    async with client.post("/_proxy/dashboard/clients/unidentified/label", data={"label": "x"},
                           allow_redirects=False) as resp:
        assert resp.status == 303 and resp.headers["Location"] == "/_proxy/login?next=%2F_proxy%2Fdashboard"
