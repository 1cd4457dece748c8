"""The migration on the dashboard, as an operator uses it: a real proxy on loopback in front of both
emulators (the V3 one and the legacy V2 one), real calls from clients in each stage (one in shadow
whose comparisons match, mismatch (V2 on another A1111 release line) and are explained, a canary
that V3's failures roll back), then Debian's chromium: the client page (its stage and where it came
from, its comparisons and their three images, the rollback's figures), the stage form, the
overview's migration panel, the clients table's stage column and filter, the features' shadow
outcomes. Over HTTP: the stage API, `GET /_proxy/migration` and the images route (auth,
validation, the change, back to the file), and their replies as proxy/openapi.json documents them.

The browser, the live proxy and the helpers are tests/test_dashboard.py's; screenshots go to the
same place (and to $DASHBOARD_SCREENSHOTS when set)."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
import requests

from proxy.dashboard import auth
from proxy.fingerprint import fingerprint
from proxy.keys import ROUTER
from proxy.migration.stages import Rule
from tests.images import encode, pattern
from tests.test_dashboard import (  # noqa: F401 (browser, shots: the module's fixtures)
    BEARER,
    SECRET,
    TOKEN,
    LiveProxy,
    browser,
    console_errors,
    log_in,
    rows,
    screenshot,
    shots,
    wait_for,
)
from tests.test_openapi import call

KEYS = {name: f"sk-migrating-{name}-0123456789" for name in ("shadow", "canary", "legacy", "mover", "scripted")}
FP = {name: fingerprint(key, SECRET.encode()) for name, key in KEYS.items()}
LABELS = {FP["shadow"]: "Photo exports", FP["canary"]: "Batch resizer"}
# 30 x 22 from 12 x 9 with crop: under v1.6 the target is rounded down to a multiple of 8, under v1.3 not
EXACT_CROP = {"upscaler_1": "4x-UltraSharp", "resize_mode": 1, "upscaling_resize_w": 30, "upscaling_resize_h": 22,
              "upscaling_crop": True}
APPROXIMATED = {"upscaler_1": "R-ESRGAN 4x+", "upscaling_resize": 4}  # a model V3 lacks: explained
DIRECT = {"upscaler_1": "R-ESRGAN 4x+ Anime6B", "upscaling_resize": 2}
IMAGE = base64.b64encode(encode(pattern(12, 9))).decode()


def migration_file(folder: Path) -> Path:
    path = folder / "migration.toml"
    path.write_text('default = "legacy"\n' + "".join(
        f'[[clients]]\nfingerprint = "{FP[name]}"\nstage = "{stage}"\npercent = {percent}\n'
        for name, stage, percent in (("shadow", "shadow", 0), ("canary", "canary", 100), ("scripted", "shadow", 0))))
    return path


class Calls:
    """V2 calls as a client makes them, through the live proxy."""

    def __init__(self, base: str) -> None:
        self.base, self.http = base, requests.Session()

    def headers(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEYS[name]}", "User-Agent": f"migrating-{name}/1.0"}

    def run(self, name: str, body: dict) -> tuple[dict, str]:
        """Submit and poll until done: (the last progress data, the side that took the task)."""
        resp = self.http.post(f"{self.base}/v2/upscale", json={**body, "image": IMAGE}, headers=self.headers(name),
                              timeout=30)
        reply = resp.json()
        assert reply["code"] == 0, reply
        for _ in range(600):
            done = self.http.get(f"{self.base}/v2/progress", params={"task_id": reply["data"]["task_id"]},
                                 headers=self.headers(name), timeout=30).json()
            assert done["code"] == 0, done
            if done["data"]["status"] in (2, 3, 4):
                return done["data"], resp.headers["X-Upscale-Proxy-Served-By"]
            time.sleep(0.02)
        raise AssertionError("the task never finished")


def migration(base: str, query: str = "", **kw) -> requests.Response:
    return requests.get(f"{base}/_proxy/migration{query}", headers=kw.pop("headers", BEARER), timeout=10, **kw)


def comparisons(base: str, name: str, count: int) -> list[dict]:
    return wait_for(lambda: (found := migration(base, f"?client={FP[name]}").json()["comparisons"])
                    and len(found) >= count and found, f"{count} comparisons of {name}", 60)


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> LiveProxy:
    root = tmp_path_factory.mktemp("migration")
    proxy = LiveProxy(root / "data", legacy=True, migration_file=migration_file(root), client_labels=json.dumps(LABELS),
                      shadow_noise_every=1, shadow_max_per_minute=1000, policy_native_scale="emulate",
                      rollback_min_calls=3, rollback_window=5)
    proxy.start()
    try:
        calls = Calls(proxy.url)
        # shadow: V2 on the proxy's release line matches; on v1.6 (multiples of 8, black bars) it does not
        assert calls.run("shadow", EXACT_CROP)[1] == "legacy"
        assert comparisons(proxy.url, "shadow", 1)[0]["outcome"] == "match"
        proxy.v2.settings.a1111_profile = "v1.6"
        calls.run("shadow", EXACT_CROP)
        assert comparisons(proxy.url, "shadow", 2)[0]["outcome"] == "mismatch"
        proxy.v2.settings.a1111_profile = "v1.3"
        calls.run("shadow", APPROXIMATED)
        assert comparisons(proxy.url, "shadow", 3)[0]["outcome"] == "explained"
        # canary: every V3 job fails, and after 3 of them the client steps back to shadow
        proxy.v3.settings.fail_rate = 1.0
        for _ in range(3):
            data, side = calls.run("canary", DIRECT)
            assert (data["status"], side) == (3, "v3")
        wait_for(lambda: proxy.app[ROUTER].rule(FP["canary"]).stage == "shadow", "the rollback")
        proxy.v3.settings.fail_rate = 0.0
        for name in ("legacy", "mover", "scripted"):
            assert calls.run(name, DIRECT)[0]["status"] == 2
        comparisons(proxy.url, "scripted", 1)  # in shadow by the file: the same image
        wait_for(lambda: set(FP.values()) <= {row["client"] for row in requests.get(
            f"{proxy.url}/_proxy/usage", headers=BEARER, timeout=10).json()["clients"]}, "the usage flush")
        yield proxy
    finally:
        proxy.stop()


def page(browser, live: LiveProxy, path: str) -> None:
    browser.get(f"{live.url}{path}")
    assert "Log in" not in browser.title, "not logged in"


def click(browser, element) -> None:
    """In the middle of the window first, at once (simple.css scrolls smoothly): the form sits low on a long page."""
    browser.execute_script("arguments[0].scrollIntoView({block: 'center', behavior: 'instant'})", element)
    element.click()


def images_drawn(browser, selector: str) -> list[dict]:
    """Each <img> of `selector`, once loaded: its natural size, and how many of its pixels are not black."""
    script = """
    const done = arguments[arguments.length - 1];
    const images = Array.from(document.querySelectorAll(arguments[0]));
    Promise.all(images.map(img => img.decode().catch(() => null))).then(() => done(images.map(img => {
      const c = document.createElement('canvas');
      c.width = img.naturalWidth; c.height = img.naturalHeight;
      let lit = 0;
      if (c.width) {
        const ctx = c.getContext('2d');
        ctx.drawImage(img, 0, 0);
        const d = ctx.getImageData(0, 0, c.width, c.height).data;
        for (let i = 0; i < d.length; i += 4) if (d[i] + d[i + 1] + d[i + 2] > 30) lit++;
      }
      return {image: img.dataset.image, width: img.naturalWidth, height: img.naturalHeight, lit: lit,
              shown: img.getBoundingClientRect().width};
    })));
    """
    return browser.execute_async_script(script, selector)


# --- in the browser ---------------------------------------------------------------------------------------

def test__client_in_shadow__its_page_shows_the_comparisons_and_the_images_of_a_difference(live, browser, shots):
    from selenium.webdriver.common.by import By

    log_in(browser, live.url)
    page(browser, live, f"/_proxy/dashboard/clients/{FP['shadow']}")
    assert browser.find_element(By.TAG_NAME, "h1").text.startswith("Photo exports")
    rule = browser.find_element(By.CSS_SELECTOR, "#stage dl.rule")
    assert "shadow" in rule.find_element(By.CSS_SELECTOR, "mark.stage").text
    assert "the migration file's rule for this client" in rule.text
    table = {tr.get_attribute("class"): tr.text
             for tr in browser.find_elements(By.CSS_SELECTOR, "#comparisons tbody tr")}
    assert set(table) == {"match", "mismatch", "explained"}
    assert "∞ dB" in table["match"] and "the same image" in table["match"]
    assert "pixels differ" in table["mismatch"] and "30×22, 30×22" in table["mismatch"]
    assert "approximates model" in table["explained"]
    summary = browser.find_element(By.ID, "client-shadow-summary").text
    assert "3 kept: 67 % matched or explained" in summary and "Noise floor" in summary and "∞ dB" in summary

    (mismatch,) = [c for c in comparisons(live.url, "shadow", 3) if c["outcome"] == "mismatch"]
    drawn = images_drawn(browser, f"#shadow-{mismatch['id']} img")
    assert [d["image"] for d in drawn] == ["v2", "v3", "heat"]
    assert all((d["width"], d["height"]) == (30, 22) and d["shown"] > 200 for d in drawn), drawn
    assert all(d["lit"] > 0 for d in drawn), drawn  # the heat map shows where they differ: the black bars
    assert len(browser.find_elements(By.CSS_SELECTOR, ".shadow-images")) == 2  # the mismatch and the explained one
    assert all(d["width"] > 0 for d in images_drawn(browser, ".shadow-images img"))
    screenshot(browser, shots, "migration-client-stage", "#stage")
    screenshot(browser, shots, "migration-client-shadow")
    assert console_errors(browser) == []


def test__rolled_back_canary__its_page_shows_the_rollback_and_its_figures(live, browser, shots):
    from selenium.webdriver.common.by import By

    log_in(browser, live.url)
    page(browser, live, f"/_proxy/dashboard/clients/{FP['canary']}")
    rule = browser.find_element(By.CSS_SELECTOR, "#stage dl.rule").text
    assert "a rollback by the proxy" in rule
    assert "3 of its last 3 translated calls failed" in rule and "failed 3, calls 3" in rule
    assert "Held until" in rule and "The file says" in rule and "canary 100 %" in rule
    (event,) = browser.find_elements(By.CSS_SELECTOR, "#stage table.events tbody tr")
    assert event.get_attribute("class") == "rollback"
    assert "canary → shadow" in event.text and "proxy" in event.text and "failed 3, calls 3" in event.text
    screenshot(browser, shots, "migration-client-rollback")
    assert console_errors(browser) == []


def test__overview__has_the_migration_panel(live, browser, shots):
    from selenium.webdriver.common.by import By

    log_in(browser, live.url)
    page(browser, live, "/_proxy/dashboard")
    panel = browser.find_element(By.ID, "migration")
    tiles = {t.get_attribute("class").split()[1]: int(t.find_element(By.CLASS_NAME, "count").text)
             for t in panel.find_elements(By.CSS_SELECTOR, ".tiles.stages .tile")}
    # shadow and scripted (the file), canary (rolled back); legacy and mover (the default)
    assert tiles == {"legacy": 2, "shadow": 3, "canary": 0, "translated": 0}
    assert "V2 still runs beside V3" in panel.text
    assert panel.find_element(By.CSS_SELECTOR, "p.summary mark").text == "legacy"  # the default
    shadow = panel.find_element(By.ID, "shadow-summary").text
    assert "Shadow comparisons kept: 4, 75 % matched or explained (match 2, explained 1, mismatch 1, error 0)" in shadow
    assert "Noise floor, V2 against itself: PSNR ∞ dB, SSIM 1.0000 (the median of 4 samples)" in shadow
    rollback = panel.find_element(By.CSS_SELECTOR, "table.events tr.rollback")
    assert "Batch resizer" in rollback.text and "canary → shadow" in rollback.text
    assert "3 of its last 3 translated calls failed" in rollback.text
    screenshot(browser, shots, "migration-overview")
    panel.find_element(By.CSS_SELECTOR, ".tile.shadow").click()
    wait_for(lambda: "stage=shadow" in browser.current_url, "the clients in shadow")
    assert sorted(rows(browser)) == sorted([FP["shadow"], FP["canary"], FP["scripted"]])
    assert console_errors(browser) == []


def test__clients_table_and_features__show_the_stages_and_the_shadow_outcomes(live, browser, shots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    log_in(browser, live.url)
    stages = {tr.get_attribute("data-client"): tr.find_element(By.CSS_SELECTOR, "td.stage-cell").text
              for tr in browser.find_elements(By.CSS_SELECTOR, "#clients tbody tr[data-client]")}
    assert stages == {FP["shadow"]: "shadow", FP["canary"]: "shadow", FP["scripted"]: "shadow",
                      FP["legacy"]: "legacy", FP["mover"]: "legacy"}
    Select(browser.find_element(By.NAME, "stage")).select_by_value("legacy")
    browser.find_element(By.CSS_SELECTOR, "form.filters button").click()
    wait_for(lambda: "stage=legacy" in browser.current_url, "the filtered URL")
    assert sorted(rows(browser)) == sorted([FP["legacy"], FP["mover"]])
    click(browser, browser.find_element(By.CSS_SELECTOR, "#clients th a[href*='sort=client']"))  # keeps the filter
    wait_for(lambda: "sort=client" in browser.current_url, "the sorted URL")
    assert "stage=legacy" in browser.current_url and len(rows(browser)) == 2
    screenshot(browser, shots, "migration-clients")

    page(browser, live, "/_proxy/dashboard/features")
    model = browser.find_element(By.CSS_SELECTOR, "#features tr[data-feature='model'] td.shadow-outcomes")
    assert model.text == "explained 1"
    screenshot(browser, shots, "migration-features")
    assert console_errors(browser) == []


def test__stage_form__moves_a_client_and_back_to_the_file(live, browser, shots, log_lines):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    log_in(browser, live.url)
    page(browser, live, f"/_proxy/dashboard/clients/{FP['mover']}")
    assert "the migration file's default" in browser.find_element(By.CSS_SELECTOR, "#stage dl.rule").text
    Select(browser.find_element(By.ID, "stage-select")).select_by_value("canary")
    percent = browser.find_element(By.ID, "stage-percent")
    percent.clear()
    percent.send_keys("30")
    click(browser, browser.find_element(By.ID, "stage-allow-route"))
    browser.find_element(By.ID, "stage-why").send_keys("shadow clean for a week <ok>")
    click(browser, browser.find_element(By.CSS_SELECTOR, "form.stage button"))
    wait_for(lambda: "staged=1" in browser.current_url, "the changed page")

    rule = live.app[ROUTER].rule(FP["mover"])
    assert (rule.stage, rule.percent, rule.allow_route, rule.source) == ("canary", 30, True, "admin")
    assert rule.by == "admin@127.0.0.1 (dashboard)" and rule.why == "shadow clean for a week <ok>"
    assert "canary 30 %" in browser.find_element(By.CSS_SELECTOR, "p.notice").text
    shown = browser.find_element(By.CSS_SELECTOR, "#stage dl.rule").text
    assert "a change by admin@127.0.0.1 (dashboard)" in shown and "“shadow clean for a week <ok>”" in shown
    (event,) = browser.find_elements(By.CSS_SELECTOR, "#stage table.events tbody tr")
    assert "legacy → canary 30 %" in event.text and event.get_attribute("class") == "admin"
    screenshot(browser, shots, "migration-client-changed")

    Select(browser.find_element(By.ID, "stage-select")).select_by_value("")  # back to the file's rule
    browser.find_element(By.ID, "stage-why").send_keys("not yet")
    click(browser, browser.find_element(By.CSS_SELECTOR, "form.stage button"))
    wait_for(lambda: live.app[ROUTER].rule(FP["mover"]).source == "default", "the file's rule again")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#stage table.events tbody tr")) == 2
    assert console_errors(browser) == []

    # the session alone, without the page's CSRF token, changes nothing
    session = {auth.COOKIE: browser.get_cookie(auth.COOKIE)["value"]}
    forged = requests.post(f"{live.url}/_proxy/dashboard/clients/{FP['mover']}/stage", data={"stage": "translated"},
                           cookies=session, timeout=10, allow_redirects=False)
    assert forged.status_code == 403 and live.app[ROUTER].rule(FP["mover"]).stage == "legacy"
    bad = requests.post(f"{live.url}/_proxy/dashboard/clients/{FP['mover']}/stage", cookies=session, timeout=10,
                        data={"stage": "canary", "percent": "lots", "csrf": live.app[auth.ADMIN].csrf})
    assert bad.status_code == 400 and "percent: a whole number from 0 to 100" in bad.text

    changed = [line for line in log_lines if line["event"] == "migration.stage_changed"]
    assert [(c["fingerprint"], c["to"], c["by"], c["why"]) for c in changed] == [
        (FP["mover"], "canary", "admin@127.0.0.1 (dashboard)", "shadow clean for a week <ok>"),
        (FP["mover"], "legacy", "admin@127.0.0.1 (dashboard)", "not yet")]
    assert TOKEN not in log_lines.text and all(key not in log_lines.text for key in KEYS.values())


# --- over HTTP --------------------------------------------------------------------------------------------

def put_stage(live: LiveProxy, name: str, body: object, headers: dict | None = None) -> requests.Response:
    return requests.put(f"{live.url}/_proxy/clients/{name}/stage", data=json.dumps(body),
                        headers={"Content-Type": "application/json", **(BEARER if headers is None else headers)},
                        timeout=10)


def test__stage_api__needs_the_token_checks_each_field_and_changes_the_stage(live, log_lines):
    scripted = FP["scripted"]
    for headers in ({}, {"Authorization": "Bearer not-the-admin-token-at-all"}):
        assert put_stage(live, scripted, {"stage": "translated"}, headers).status_code == 401
    assert live.app[ROUTER].rule(scripted).stage == "shadow"
    for name, body, parameter in (
        ("sk-not-a-fingerprint", {"stage": "shadow"}, "fingerprint"),
        ("unidentified", {"stage": "shadow"}, "fingerprint"),
        (scripted, [], "body"), (scripted, {}, "stage"), (scripted, {"stage": "done"}, "stage"),
        (scripted, {"stage": "canary"}, "percent"), (scripted, {"stage": "canary", "percent": 101}, "percent"),
        (scripted, {"stage": "canary", "percent": True}, "percent"),
        (scripted, {"stage": "canary", "percent": 2.5}, "percent"),
        (scripted, {"stage": "shadow", "allow_route": "yes"}, "allow_route"),
        (scripted, {"stage": "shadow", "why": "a\nb"}, "why"), (scripted, {"stage": "shadow", "why": "x" * 201}, "why"),
        (scripted, {"stage": "shadow", "percentage": 5}, "percentage"),
    ):
        bad = put_stage(live, name, body)
        assert bad.status_code == 400 and bad.json()["parameter"] == parameter, (body, bad.text)
    not_json = requests.put(f"{live.url}/_proxy/clients/{scripted}/stage", data=b"{", headers=BEARER, timeout=10)
    assert not_json.status_code == 400 and not_json.json()["parameter"] == "body"
    assert live.app[ROUTER].rule(scripted).source == "file"  # nothing changed

    moved = put_stage(live, scripted, {"stage": "canary", "percent": 25, "why": "first quarter"})
    assert moved.status_code == 200, moved.text
    doc = moved.json()
    assert (doc["client"], doc["stage"], doc["percent"], doc["source"], doc["by"], doc["why"]) == (
        scripted, "canary", 25, "admin", "admin@127.0.0.1 (API)", "first quarter")
    assert doc["allow_route"] is False and doc["at"] > 0
    assert live.app[ROUTER].rule(scripted) == Rule.from_doc(doc)
    (event, *_) = migration(live.url).json()["events"]
    assert (event["fingerprint"], event["from"], event["to"], event["percent"], event["source"]) == (
        scripted, "shadow", "canary", 25, "admin")
    row = requests.get(f"{live.url}/_proxy/usage/clients/{scripted}", headers=BEARER, timeout=10).json()
    assert row["migration"]["stage"] == "canary"  # the usage rows carry the rule: the clients table's column
    csv = requests.get(f"{live.url}/_proxy/usage?format=csv&stage=canary", headers=BEARER, timeout=10).text
    assert csv.splitlines()[0].endswith(",stage") and scripted in csv and csv.splitlines()[1].endswith(",canary")

    back = put_stage(live, scripted, {"stage": None, "why": "not yet"})
    assert back.status_code == 200 and (back.json()["stage"], back.json()["source"]) == ("shadow", "file")
    assert live.app[ROUTER].rule(scripted).source == "file"
    changed = [line for line in log_lines if line["event"] == "migration.stage_changed"]
    assert [(c["to"], c["by"], c["why"]) for c in changed] == [
        ("canary", "admin@127.0.0.1 (API)", "first quarter"), ("shadow", "admin@127.0.0.1 (API)", "not yet")]
    refused = [line for line in log_lines if line["event"] == "admin.refused"]
    assert len(refused) == 2 and TOKEN not in log_lines.text and "not-the-admin-token" not in log_lines.text

    # a session cookie opens the pages and the JSON, not the admin API
    http = requests.Session()
    assert http.get(f"{live.url}/_proxy/dashboard?token={TOKEN}", timeout=10).status_code == 200
    assert http.get(f"{live.url}/_proxy/migration", timeout=10).status_code == 200
    assert http.put(f"{live.url}/_proxy/clients/{scripted}/stage", json={"stage": "translated"},
                    timeout=10).status_code == 401


def test__migration_json__is_every_known_client_the_last_changes_and_comparisons(live):
    assert migration(live.url, headers={}).status_code == 401
    doc = migration(live.url).json()
    assert doc["v2_gone"] is None and doc["default"]["stage"] == "legacy" and doc["canary_hash"] == "client"
    rules = {c["client"]: c for c in doc["clients"]}
    assert set(FP.values()) <= set(rules)
    assert (rules[FP["shadow"]]["stage"], rules[FP["shadow"]]["source"], rules[FP["shadow"]]["label"]) == (
        "shadow", "file", "Photo exports")
    assert rules[FP["canary"]]["source"] == "rollback" and rules[FP["canary"]]["hold_until"] > time.time()
    assert sum(doc["clients_by_stage"].values()) == len(doc["clients"])
    assert doc["shadow"]["by_outcome"] == {"match": 2, "explained": 1, "mismatch": 1, "error": 0}
    assert doc["shadow"]["match_rate"] == 0.75
    assert doc["noise_floor"] == {"samples": 4, "psnr": "inf", "ssim": 1.0, "by_outcome": {"match": 4}}
    assert doc["comparisons"][0]["fingerprint"] == FP["scripted"] and doc["comparisons"][0]["image_urls"] == {}
    newest = doc["comparisons"][1]
    assert newest["outcome"] == "explained" and newest["psnr"] < 40 and newest["explained_by"] == ["model"]
    assert set(newest["image_urls"]) == {"v2", "v3", "heat"}
    assert [e["source"] for e in doc["events"]].count("rollback") == 1

    one = migration(live.url, f"?client={FP['canary']}").json()
    assert (one["stage"], one["file_rule"]["stage"], one["file_rule"]["percent"]) == ("shadow", "canary", 100)
    assert one["comparisons"] == [] and [e["to"] for e in one["events"]] == ["shadow"]
    bad = migration(live.url, "?client=unidentified")
    assert bad.status_code == 400 and bad.json()["parameter"] == "client"


def test__shadow_images__are_served_to_the_admin_only(live):
    (mismatch,) = [c for c in comparisons(live.url, "shadow", 3) if c["outcome"] == "mismatch"]
    for name, url in mismatch["image_urls"].items():
        png = requests.get(live.url + url, headers=BEARER, timeout=10)
        assert png.status_code == 200 and png.headers["Content-Type"] == "image/png", name
        assert png.content.startswith(b"\x89PNG") and png.headers["X-Content-Type-Options"] == "nosniff"
        assert requests.get(live.url + url, timeout=10).status_code == 401
    for path in (f"/_proxy/dashboard/shadow/{'0' * 32}/v2.png", f"/_proxy/dashboard/shadow/{mismatch['id']}/other.png",
                 "/_proxy/dashboard/shadow/..%2F..%2Fmigration/v2.png"):
        gone = requests.get(live.url + path, headers=BEARER, timeout=10)
        assert gone.status_code == 404 and gone.json()["error"] == "not found", path


# --- as documented ----------------------------------------------------------------------------------------

async def test__replies__are_the_documented_ones_with_and_without_a_legacy_v2(emulator, legacy, start_proxy, tmp_path):
    v3, v2 = emulator[0], legacy[0]
    me, other = "0123456789abcdef", "fedcba9876543210"
    put, form = "/_proxy/clients/{fingerprint}/stage", "/_proxy/dashboard/clients/{fingerprint}/stage"
    image = "/_proxy/dashboard/shadow/{id}/{image}.png"

    without = await start_proxy(str(v3.make_url("")), admin_token=TOKEN)
    resp, body = await call(without, "PUT", f"/_proxy/clients/{me}/stage", put, json={"stage": "shadow"},
                            headers=BEARER)
    assert resp.status == 404 and b"No legacy V2" in body
    resp, _ = await call(without, "GET", "/_proxy/migration", headers=BEARER)
    assert resp.status == 404
    resp, _ = await call(without, "POST", f"/_proxy/dashboard/clients/{me}/stage", form, headers=BEARER,
                         data={"stage": "shadow", "csrf": without.server.app[auth.ADMIN].csrf})
    assert resp.status == 404

    proxy = await start_proxy(str(v3.make_url("")), v2_upstream=str(v2.make_url("")), admin_token=TOKEN,
                              data_dir=tmp_path / "with-v2")
    csrf = proxy.server.app[auth.ADMIN].csrf
    for body, headers, status in (({"stage": "canary", "percent": 5, "allow_route": True, "why": "go"}, BEARER, 200),
                                  ({"stage": None}, BEARER, 200), ({"stage": "later"}, BEARER, 400),
                                  ({"stage": "shadow"}, {}, 401)):
        resp, _ = await call(proxy, "PUT", f"/_proxy/clients/{me}/stage", put, json=body, headers=headers)
        assert resp.status == status
    for query, headers, status in (("", BEARER, 200), (f"?client={me}", BEARER, 200), ("?client=me", BEARER, 400),
                                   ("", {}, 401)):
        resp, _ = await call(proxy, "GET", "/_proxy/migration" + query, headers=headers)
        assert resp.status == status
    resp, _ = await call(proxy, "POST", f"/_proxy/dashboard/clients/{other}/stage", form, headers=BEARER,
                         data={"stage": "translated", "why": "by form", "csrf": csrf}, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == f"/_proxy/dashboard/clients/{other}?staged=1#stage"
    assert proxy.server.app[ROUTER].rule(other).stage == "translated"
    for data, status in (({"stage": "translated"}, 403), ({"stage": "canary", "csrf": csrf}, 400)):
        resp, _ = await call(proxy, "POST", f"/_proxy/dashboard/clients/{other}/stage", form, headers=BEARER, data=data)
        assert resp.status == status
    resp, _ = await call(proxy, "GET", f"/_proxy/dashboard/shadow/{'a' * 32}/heat.png", image, headers=BEARER)
    assert resp.status == 404
    resp, _ = await call(proxy, "GET", f"/_proxy/dashboard/shadow/{'a' * 32}/heat.png", image)
    assert resp.status == 401
