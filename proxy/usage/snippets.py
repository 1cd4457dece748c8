"""What a client must send V3 instead, as code to copy, and a notice for its team: pure functions
for the dashboard's client page (no I/O, no clock).

`snippets_for` turns a body shape (the usage store's `body|` counts, `v2.translation.shape_of`)
into the V3 requests the proxy sends for such a body, each as curl, Python (requests), JavaScript
(fetch, Node 18+) and Go (net/http) code that submits it, polls the task and prints the image
URLs; and what V3 leaves to the client. `notice` writes the plain-text message an operator sends
a client's team.

The code templates are plain strings with `{{NAME}}` holes (no `$` or `{}`: bash, JavaScript and
Go use those). Each reads the key from NOVITA_API_KEY and the image from input.png.
"""

from __future__ import annotations

import json
import re
import shlex
from datetime import UTC, datetime

import orjson

from proxy.errors import V2Error
from proxy.translate.features import BY_NAME
from proxy.v2.translation import Translator

LANGUAGES = ("curl", "python", "javascript", "go")
V3_JOB = "V3 job:"  # how a Plan describes a V3 job (steps.V3Job.describe), among its local steps
_SPLIT = "IMAGE_BASE64_GOES_HERE"  # where the curl snippet streams the image into its body

CURL = """\
#!/usr/bin/env bash
# {{TITLE}}
# input.png: {{INPUT}}
# needs curl and base64; run with NOVITA_API_KEY set
set -euo pipefail
: "${NOVITA_API_KEY:?set NOVITA_API_KEY to your V3 key}"
BASE_URL={{BASE_URL}}
body=$(mktemp)
trap 'rm -f "$body"' EXIT

# the V3 request, with input.png's base64 as request.image_base64 (streamed into a file: an
# image's base64 is too long for a command line)
{
  cat <<'JSON'
{{BODY_HEAD}}
JSON
  printf '"'; base64 < input.png | tr -d '\\n'; printf '"\\n'
  cat <<'JSON'
{{BODY_TAIL}}
JSON
} > "$body"

reply=$(curl -sS -X POST "$BASE_URL/v3/async/upscale" \\
  -H "Authorization: Bearer $NOVITA_API_KEY" -H "Content-Type: application/json" \\
  --data-binary @"$body")
task_id=$(printf '%s' "$reply" | sed -n 's/.*"task_id" *: *"\\([^"]*\\)".*/\\1/p')
if [ -z "$task_id" ]; then echo "upscale: $reply" >&2; exit 1; fi

while :; do  # QUEUED, PROCESSING (or UNKNOWN) until SUCCEED or FAILED
  sleep 1
  result=$(curl -sS "$BASE_URL/v3/async/task-result?task_id=$task_id" \\
    -H "Authorization: Bearer $NOVITA_API_KEY")
  case "$result" in
    *'"TASK_STATUS_SUCCEED"'*) break ;;
    *'"TASK_STATUS_FAILED"'*) echo "task failed: $result" >&2; exit 1 ;;
    *'"task"'*) ;;
    *) echo "task-result: $result" >&2; exit 1 ;;  # an error: V3 says why
  esac
done
# each images[].image_url (a JSON encoder may write a signed URL's & as \\u0026, / as \\/)
printf '%s' "$result" | grep -o '"image_url" *: *"[^"]*"' \\
  | sed -e 's/.*"\\([^"]*\\)"$/\\1/' -e 's/\\\\u0026/\\&/g' -e 's#\\\\/#/#g'
"""

PYTHON = '''\
# {{TITLE}}
# input.png: {{INPUT}}
# needs requests (pip install requests); run with NOVITA_API_KEY set
import base64
import json
import os
import time

import requests

BASE_URL = {{BASE_URL}}
HEADERS = {"Authorization": "Bearer " + os.environ["NOVITA_API_KEY"]}

# the V3 request, but request.image_base64: input.png's base64, added below
body = json.loads(r"""
{{BODY}}
""")
with open("input.png", "rb") as f:
    body["request"]["image_base64"] = base64.b64encode(f.read()).decode()


def call(method, path, **kwargs):
    reply = requests.request(method, BASE_URL + path, headers=HEADERS, timeout=60, **kwargs)
    if not reply.ok:  # V3 says why in the body: {"code", "reason", "message"}
        raise SystemExit(f"{method} {path}: {reply.status_code} {reply.text}")
    return reply.json()


task_id = call("POST", "/v3/async/upscale", json=body)["task_id"]
while True:  # QUEUED, PROCESSING (or UNKNOWN) until SUCCEED or FAILED
    time.sleep(1)
    result = call("GET", "/v3/async/task-result", params={"task_id": task_id})
    status = result["task"]["status"]
    if status == "TASK_STATUS_SUCCEED":
        break
    if status == "TASK_STATUS_FAILED":
        raise SystemExit("task failed: " + result["task"]["reason"])

for image in result["images"]:  # each URL works for image_url_ttl seconds (3600)
    print(image["image_url"])
'''

JAVASCRIPT = """\
// {{TITLE}}
// input.png: {{INPUT}}
// Node 18+ (global fetch); run with NOVITA_API_KEY set: node upscale.js
const BASE_URL = {{BASE_URL}};

// the V3 request, but request.image_base64: input.png's base64, added below
const body = {{BODY}};

async function call(method, path, payload) {
  const reply = await fetch(BASE_URL + path, {
    method,
    headers: { Authorization: `Bearer ${process.env.NOVITA_API_KEY}`, "Content-Type": "application/json" },
    body: payload === undefined ? undefined : JSON.stringify(payload),
  });
  const text = await reply.text();
  if (!reply.ok) throw new Error(`${method} ${path}: ${reply.status} ${text}`); // V3 says why
  return JSON.parse(text);
}

async function main() {
  if (!process.env.NOVITA_API_KEY) throw new Error("set NOVITA_API_KEY to your V3 key");
  const { readFileSync } = await import("node:fs"); // works in a CommonJS file and in a module
  body.request.image_base64 = readFileSync("input.png").toString("base64");
  const { task_id } = await call("POST", "/v3/async/upscale", body);
  for (;;) { // QUEUED, PROCESSING (or UNKNOWN) until SUCCEED or FAILED
    await new Promise((resolve) => setTimeout(resolve, 1000));
    const result = await call("GET", `/v3/async/task-result?task_id=${encodeURIComponent(task_id)}`);
    if (result.task.status === "TASK_STATUS_FAILED") throw new Error(`task failed: ${result.task.reason}`);
    if (result.task.status === "TASK_STATUS_SUCCEED") {
      for (const image of result.images) console.log(image.image_url);
      return;
    }
  }
}

main().catch((error) => {
  console.error(error.message);
  process.exitCode = 1;
});
"""

GO = """\
// {{TITLE}}
// input.png: {{INPUT}}
// Go 1.18+; run with NOVITA_API_KEY set: go run upscale.go
package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"time"
)

const baseURL = {{BASE_URL}}

// the V3 request, but request.image_base64: input.png's base64, added below
const bodyJSON = `{{BODY}}`

var client = &http.Client{Timeout: time.Minute}

type taskResult struct {
	Task struct {
		Status string `json:"status"`
		Reason string `json:"reason"`
	} `json:"task"`
	Images []struct {
		ImageURL string `json:"image_url"`
	} `json:"images"`
}

func main() {
	key := os.Getenv("NOVITA_API_KEY")
	if key == "" {
		fail("set NOVITA_API_KEY to your V3 key")
	}
	var body map[string]any
	if err := json.Unmarshal([]byte(bodyJSON), &body); err != nil {
		fail(err)
	}
	input, err := os.ReadFile("input.png")
	if err != nil {
		fail(err)
	}
	body["request"].(map[string]any)["image_base64"] = base64.StdEncoding.EncodeToString(input)
	payload, err := json.Marshal(body)
	if err != nil {
		fail(err)
	}

	var submitted struct {
		TaskID string `json:"task_id"`
	}
	call(key, "POST", "/v3/async/upscale", payload, &submitted)
	for { // QUEUED, PROCESSING (or UNKNOWN) until SUCCEED or FAILED
		time.Sleep(time.Second)
		var result taskResult
		call(key, "GET", "/v3/async/task-result?task_id="+url.QueryEscape(submitted.TaskID), nil, &result)
		switch result.Task.Status {
		case "TASK_STATUS_SUCCEED":
			for _, image := range result.Images {
				fmt.Println(image.ImageURL)
			}
			return
		case "TASK_STATUS_FAILED":
			fail("task failed: " + result.Task.Reason)
		}
	}
}

// call sends one request to V3 and decodes its JSON reply into out; an error's body says why.
func call(key, method, path string, payload []byte, out any) {
	request, err := http.NewRequest(method, baseURL+path, bytes.NewReader(payload))
	if err != nil {
		fail(err)
	}
	request.Header.Set("Authorization", "Bearer "+key)
	request.Header.Set("Content-Type", "application/json")
	reply, err := client.Do(request)
	if err != nil {
		fail(err)
	}
	defer reply.Body.Close()
	data, err := io.ReadAll(reply.Body)
	if err != nil {
		fail(err)
	}
	if reply.StatusCode != http.StatusOK {
		fail(fmt.Sprintf("%s %s: %d %s", method, path, reply.StatusCode, data))
	}
	if err := json.Unmarshal(data, out); err != nil {
		fail(err)
	}
}

func fail(why any) {
	fmt.Fprintln(os.Stderr, why)
	os.Exit(1)
}
"""

_HOLE = re.compile(r"\{\{([A-Z_]+)\}\}")


def _fill(template: str, **values: str) -> str:
    # one pass, so that a value is never read as a template (a body could hold "{{")
    return _HOLE.sub(lambda m: values[m.group(1)], template)


def _one_line(text: str) -> str:
    return " ".join(text.split())  # it goes into a comment line


def _without_image(request: dict) -> dict:
    return {**request, "request": {k: v for k, v in request["request"].items() if k != "image_base64"}}


def code_for(request: dict, *, title: str, source: str, base_url: str) -> dict[str, str]:
    """The code that sends one V3 request (the preview's, with any `image_base64`: it is read
    from input.png, which is `source`), polls it and prints its image URLs, by language (LANGUAGES).
    `title` and `source` go into the code's first comments."""
    body = json.dumps(_without_image(request), indent=2)
    # curl streams the image between the JSON before and after it, so it needs the whole body
    head, tail = json.dumps({**request, "request": {**request["request"], "image_base64": _SPLIT}},
                            indent=2).split(f'"{_SPLIT}"')
    common = {"TITLE": _one_line(title), "INPUT": _one_line(source), "BODY": body}
    url = base_url.rstrip("/")
    return {
        "curl": _fill(CURL, **common, BASE_URL=shlex.quote(url), BODY_HEAD=head, BODY_TAIL=tail.lstrip("\n")),
        "python": _fill(PYTHON, **common, BASE_URL=json.dumps(url)),
        "javascript": _fill(JAVASCRIPT, **common, BASE_URL=json.dumps(url)),
        # a backtick would end Go's raw string: written as the JSON escape it equals
        "go": _fill(GO, **{**common, "BODY": body.replace("`", "\\u0060")}, BASE_URL=json.dumps(url)),
    }


def _input(placeholder: str, n: int, image: dict) -> str:
    """What input.png must be for request n, in plain words, from the preview's placeholder."""
    if placeholder.startswith("<the PNG of V3 job"):  # a chain: the previous request's result
        return f"the PNG that request {n - 1} returned (download its image URL)"
    if "pixels" in placeholder:  # "<base64 of the input's pixels as an RGB PNG: WxH>"
        size = placeholder.strip("<>").rsplit(": ", 1)[-1]
        return f"your image's pixels as an RGB PNG ({size}), made as the steps below say"
    return f"your image, as you sent it to V2 ({image['format']} {image['width']}x{image['height']})"


def snippets_for(shape: str, translator: Translator, base_url: str) -> list[dict]:
    """What a client that sends V2 bodies of this shape (`v2.translation.shape_of`, the usage
    store's `body|` key) must do on V3, as of the translator's settings now, as a list of entries
    for the page to show in order. Every entry has `kind`, `title`, `text` (plain words) and
    `items` (a list of lines, maybe empty):

    - kind "request", one per V3 request (usually one; a composed body chains several): also
      `request` (the preview's request, image_base64 a placeholder), `json` (it as indented JSON),
      `input` (what input.png must be) and `code`: {"curl", "python", "javascript", "go"}, each
      runnable, submitting `POST {base_url}/v3/async/upscale` with the key from NOVITA_API_KEY,
      polling `GET {base_url}/v3/async/task-result` to the end and printing the image URLs.
    - kind "local", when V3 leaves work to the client: `items`, every step in order, the requests
      among them, the rest done locally; `output`: {"width", "height"} of V2's result.
    - kind "warnings", when the result differs from V2's: `items`, the differences.
    - kind "error", the only entry, when the shape can't be planned any more (a strict policy now
      refuses it, say): `text` is the V2 error, `v2_code` its code.
    """
    try:
        preview = translator.preview_shape(shape)
    except V2Error as e:
        return [{"kind": "error", "title": "This body is refused now", "items": [], "v2_code": int(e.code),
                 "text": f"The proxy would answer such a body with V2 code {int(e.code)}: {e.msg}"}]
    image = orjson.loads(shape)["image"]
    requests, steps = preview["v3_requests"], preview["local_steps"]
    jobs = [line for line in steps if V3_JOB in line]  # in the order of the requests
    entries = []
    for n, request in enumerate(requests, 1):
        what = jobs[n - 1].replace(V3_JOB + " ", "") if len(jobs) == len(requests) else request["request"]["model_name"]
        title = f"V3 request {n} of {len(requests)}: {what}"
        source = _input(request["request"].get("image_base64", ""), n, image)
        shown = {**request, "request": {**request["request"], "image_base64": "<base64 of input.png>"}}
        entries.append({
            "kind": "request", "title": title, "items": [], "request": request,
            "json": json.dumps(shown, indent=2), "input": source,
            "text": f"Send this request with input.png being {source}; then poll its task to the end.",
            "code": code_for(request, title=title, source=source, base_url=base_url),
        })
    # the first step only says how V2 read the input: with nothing else local, V3's reading will do
    if [line for line in steps if V3_JOB not in line] != steps[:1] or not requests:
        order = iter(range(1, len(requests) + 1))
        output = preview["output"]
        entries.append({
            "kind": "local", "title": "What V3 leaves to you",
            "text": (("V2 did all of this, in this order; V3 does only the requests, the rest is for you to do "
                      "locally." if requests else "This body needs no V3 request: V2 did all of this, and now you "
                      "do it locally.") + f" V2's result: {output['width']}x{output['height']}."),
            "items": [f"send V3 request {next(order)}" if V3_JOB in line else line for line in steps],
            "output": output,
        })
    if preview["warnings"]:
        entries.append({"kind": "warnings", "title": "How the result differs from V2's",
                        "text": "The proxy says so in V2's warn; V3 will not.", "items": preview["warnings"]})
    return entries


# --- the notice -----------------------------------------------------------------------------------

def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _date(value: str | datetime | None) -> str | None:
    if not value:
        return None
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    moment = moment.astimezone(UTC) if moment.tzinfo else moment
    return f"{moment:%Y-%m-%d}" if (moment.hour, moment.minute) == (0, 0) else f"{moment:%Y-%m-%d %H:%M} UTC"


def _when(iso: str) -> str:
    return iso.replace("T", " ").replace("Z", " UTC") if iso else "never"


def _who(client: dict) -> str:
    if client["client"] == "unidentified":
        return "calls without an API key (unidentified)"
    fingerprint = f"key fingerprint {client['client']}"
    return f"{client['label']} ({fingerprint})" if client.get("label") else fingerprint


def _deadline(client: dict, sunset: str | None) -> str:
    days = client.get("days_left")
    if sunset is None or days is None:
        return "No sunset date is set for V2 yet."
    if days < 0:
        return f"V2's sunset date, {sunset}, passed {_plural(-days, 'day')} ago: V2 calls may be refused."
    return f"V2's sunset date is {sunset}: {_plural(days, 'day') if days else 'less than a day'} left."


def _feature_lines(client: dict) -> list[str]:
    lines = []
    for help in client.get("feature_help", []):
        unit = BY_NAME.get(help["name"])
        name = f"{type(unit).__name__} ({', '.join(unit.fields)})" if unit else help["name"]
        blocking = ", V3 lacks it" if help["name"] in client.get("blocking", ()) else ""
        lines.append(f"- {name}{blocking}: {help['summary']} In V3: {help['v3']}.")
    return lines


def notice(client: dict, *, guide_url: str, dashboard_url: str | None = None) -> str:
    """A plain-text notice for a client's team, from `view.client()`'s dict: who (label and key
    fingerprint, never a key), its V2 and V3 calls over the period and its last calls, its
    readiness, the sunset date and the days left, each V2 feature it uses with what V3 offers
    instead (those V3 lacks marked), what to change and where the guide is.

    view.client() does not carry the sunset date: pass it as `client["sunset"]` (an ISO string,
    as the clients table's "sunset", or a datetime); without it the notice says none is set.
    """
    sunset = _date(client.get("sunset"))
    state, who = client["readiness"], _who(client)
    subject = {
        "migrated": "moved from the V2 upscale API to V3, nothing to do",
        "quiet": "no recent calls to the upscale API",
    }.get(state, "move from the V2 upscale API to V3" + (f" by {sunset}" if sunset else ""))
    out = [f"Subject: {who}: {subject}", "",
           f"Client: {who}.",
           f"In the last {_plural(client['days'], 'day')}: {_plural(client['v2_calls'], 'call')} to the "
           f"deprecated V2 upscale API (POST /v2/upscale, GET /v2/progress), "
           f"{_plural(client['v3_calls'], 'call')} to V3.",
           f"Last V2 call: {_when(client['last_v2'])}. Last call to either API: {_when(client['last_seen'])}.",
           _deadline(client, sunset), ""]
    if state == "migrated":
        out.append("It calls V3 and no longer calls V2: nothing to change.")
    elif state == "quiet":
        out.append("It has made no recent call to either API. If it still runs, it must use V3 "
                   "(POST /v3/async/upscale, then GET /v3/async/task-result?task_id=...) "
                   + (f"before {sunset}." if sunset else "before V2 is switched off."))
    else:
        out.append("What to change: send POST /v3/async/upscale instead of POST /v2/upscale, and poll "
                   "GET /v3/async/task-result?task_id=... instead of GET /v2/progress"
                   + (f", by {sunset}." if sunset else "."))
        if state == "blocked":
            names = ", ".join(type(BY_NAME[n]).__name__ if n in BY_NAME else n for n in client["blocking"])
            out.append(f"It uses V2 features V3 lacks ({names}): V3 does not do them; they must be done "
                       "locally (each line below says how), or dropped.")
        else:
            out.append("Every V2 feature it uses has a way in V3.")
    lines = _feature_lines(client) if state in ("blocked", "ready") else []
    if lines:
        out += ["", "V2 features it uses:", *lines]
    out += ["", f"Migration guide: {guide_url}"]
    if dashboard_url:
        out.append(f"This client's requests, as V3 code to copy: {dashboard_url}")
    return "\n".join(out) + "\n"
