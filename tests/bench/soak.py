"""Soak (not a test): legacy SDKs through two replicas behind a load balancer, faults on a schedule.

On loopback only, every process on a free 127.0.0.1 port, all started here and stopped here (also
on Ctrl-C or an error):

    SDK clients -> load balancer -> 2 x `upscale-v2-proxy serve` -> fault front -> V3 emulator
                   (round robin,      (one Redis, a data dir       (tests/fake_upstream.py)
                    fails over)        each)

- Clients, until the end: the Python SDK novita-client 0.4.12 (`upscale` then `wait_for_task`, in
  threads) and the JS SDK novita-sdk@1.0.31 (`upscaleSync`, tests/bench/soak_client.js, installed
  by npm into tests/bench/.sdk/), each with its own fake key. Each SDK starts a new task about every
  --interval seconds, whatever the earlier ones are doing, so that every fault meets submissions
  as well as polls (a client that waits for its task before the next would sit out an outage in
  its wait loop). A task submits a small real PNG with one of a few V2 bodies (direct, and
  composed: scale-to with a crop, a blend of two upscalers), waits for the result and downloads
  it. No Go V2 SDK is available from the registries here.
- Faults, at fixed fractions of the run: V3 down (port closed) then up, a burst of 502s, V3's 429s,
  Redis restarted (saved, stopped, started on the same port and data), one replica SIGKILLed and
  started again a bit later. The emulator also fails a few jobs itself (FAIL_RATE): that is the
  upstream failing the job, and the clients must see it as a failed task.
- Report (stdout and tests/bench/results/<date>-soak.md): the calls (submissions, polls, image
  downloads, by client, as the load balancer saw them), the tasks (succeeded, failed, timed out),
  the V2 replies in each fault window, and every client-visible failure with its cause and the
  fault window it fell in.

The goal: no client-visible failure that the upstream did not cause. Excused, and listed apart:
a task V3 failed itself, and a submission answered with a "retry" code (5 or 9) while V3 was
down, answering 502 or 429, or within TAIL seconds after (the circuit breaker's cool-down).
Everything else counts, Redis and replica faults included, and makes the exit status 1.

    .venv/bin/python -m tests.bench.soak [--minutes 6.5] [--interval 0.8] [--no-js] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import logging
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web
from PIL import Image

from proxy.fingerprint import fingerprint
from tests.bench.common import BIN, free_port, machine, wait_port
from tests.fake_upstream import FakeUpstream, Fault
from tests.redis_server import RedisServer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SDK_DIR = HERE / ".sdk"  # the JS SDK's npm install (git-ignored)
JS_SDK = "novita-sdk@1.0.31"
KEYS = {"python": "sk-soak-python", "js": "sk-soak-js"}  # made up: one per client, as tenants have
EMULATOR = {"queue_delay": 0.5, "process_delay": 1.5, "fail_rate": 0.03}  # ~2 s a V3 job
FAIL_REASON = "upscale failed (injected by the emulator)"  # the emulator's own, told apart from the proxy's
TAIL = 20.0  # seconds after a V3 fault its effects may still show (breaker cool-down 10 s, a probe)
DRAIN = 45.0  # seconds the tasks in flight at the end get to finish
HARD_LIMIT = 570.0  # seconds: past this the run is stopped, whatever it is doing (the bound is 10 min)
JS_TASK_TIMEOUT = 180  # seconds; the JS SDK never gives up by itself (Python's waits ~300 polls)
RETRY_CODES = {5, 9}  # V2's "host unavailable" and "timeout": the client may submit again
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# V2 bodies: one direct (one V3 job is the answer), two composed (local steps after V3)
BODIES = [
    ("direct 2x", {"upscaler_1": "R-ESRGAN 4x+", "resize_mode": 0, "upscaling_resize": 2}),
    ("scale-to + crop", {"upscaler_1": "R-ESRGAN 4x+", "resize_mode": 1, "upscaling_resize_w": 120,
                         "upscaling_resize_h": 60, "upscaling_crop": True}),
    ("blend", {"upscaler_1": "4x-UltraSharp", "resize_mode": 0, "upscaling_resize": 2,
               "upscaler_2": "R-ESRGAN 4x+ Anime6B", "extras_upscaler_2_visibility": 0.4}),
]


def png_b64() -> str:
    """A 48 x 32 RGB PNG: a gradient with some noise, so that the upscales have something to do."""
    rng = random.Random(7)
    image = Image.new("RGB", (48, 32))
    image.putdata([(x * 5, y * 8, rng.randrange(256)) for y in range(32) for x in range(48)])
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


# --- the clock and the log ---------------------------------------------------------------------

T0 = time.time()  # reset when the load starts


def since(t: float | None = None) -> float:
    return (time.time() if t is None else t) - T0


def say(what: str) -> None:
    print(f"[{since():+7.1f} s {datetime.now():%H:%M:%S}] {what}", flush=True)


# --- processes ---------------------------------------------------------------------------------

def loopback_only() -> None:
    """No HTTP proxy for this process (requests, under the Python SDK, reads these) nor its
    children (axios, under the JS SDK, too): every call stays on 127.0.0.1."""
    for name in [n for n in os.environ if n.lower() in ("http_proxy", "https_proxy", "all_proxy")]:
        del os.environ[name]
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "*"


def child_env(**settings: str) -> dict[str, str]:
    """This process's environment (so UPSCALE_PROXY_* tunings reach the children), `settings` on top."""
    return {**os.environ, **settings}


def spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A child in its own process group (a terminal's Ctrl-C reaches only us: we stop it)."""
    with log.open("ab") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def signal_group(proc: subprocess.Popen | asyncio.subprocess.Process, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def stop_processes(*procs: subprocess.Popen | None, grace: float = 25.0) -> None:
    """SIGTERM to each group, then SIGKILL to whatever is left after `grace` seconds."""
    live = [p for p in procs if p is not None and p.poll() is None]
    for p in live:
        signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in live:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            signal_group(p, signal.SIGKILL)
            p.wait()


class Replica:
    """One `upscale-v2-proxy serve`, on a fixed port and data dir (kept across a restart)."""

    def __init__(self, n: int, env: dict[str, str], work: Path) -> None:
        self.name, self.port = f"replica {n}", free_port()
        self.env = {**env, "UPSCALE_PROXY_DATA_DIR": str(work / f"replica{n}")}
        self.log = work / f"replica{n}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.proc = spawn([str(BIN), "serve", "--host", "127.0.0.1", "--port", str(self.port),
                           "--log-format", "json"], self.env, self.log)
        await wait_port(self.port)

    def kill(self) -> None:
        assert self.proc is not None
        signal_group(self.proc, signal.SIGKILL)
        self.proc.wait()


# --- the load balancer -------------------------------------------------------------------------

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "host", "content-length",
       "proxy-authorization", "proxy-connection"}


@dataclass
class Seen:
    """One request as the load balancer passed it on, and the reply the client got."""

    t: float
    client: str
    kind: str  # submit, poll, image, other
    status: int  # HTTP status the client got
    code: int | None = None  # V2 code of a JSON reply
    data_null: bool = False


class Balancer:
    """Round robin over the replicas, as a load balancer with passive health checks: a replica
    that refuses a connection is left alone for a few seconds and the request goes to the other.
    A request the replica may have received is tried elsewhere only if it is a GET: like nginx's
    proxy_next_upstream by default, a POST is never sent twice. New connection per request (no
    upstream keep-alive): a killed replica shows as refused connections, not stale ones."""

    SKIP = 5.0  # seconds a replica that refused a connection is skipped

    def __init__(self, backends: list[str], clients: dict[str, str], port: int = 0) -> None:
        self.backends, self.clients, self.port = backends, clients, port
        self.seen: list[Seen] = []
        self.failovers = 0
        self._next = itertools.count()
        self._skip_until = dict.fromkeys(backends, 0.0)
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Balancer:
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True), auto_decompress=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent"), timeout=aiohttp.ClientTimeout(total=120, connect=5))
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)  # 0: any free port
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()

    def _order(self) -> list[str]:
        start = next(self._next) % len(self.backends)
        turn = self.backends[start:] + self.backends[:start]
        now = time.monotonic()
        return [b for b in turn if self._skip_until[b] <= now] + [b for b in turn if self._skip_until[b] > now]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._http is not None
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        reply = web.Response(status=502, text="502 Bad Gateway (soak load balancer: no replica answered)")
        for n, backend in enumerate(self._order()):
            if n:
                self.failovers += 1
            try:
                async with self._http.request(request.method, backend + request.raw_path, headers=headers,
                                              data=body or None, allow_redirects=False) as up:
                    data = await up.read()
                    out = {k: v for k, v in up.headers.items() if k.lower() not in HOP}
                    reply = web.Response(status=up.status, body=data, headers=out)
                    break
            except aiohttp.ClientConnectorError:  # never reached it: safe to try the other
                self._skip_until[backend] = time.monotonic() + self.SKIP
            except (aiohttp.ClientError, asyncio.TimeoutError):  # it may have the request
                if request.method != "GET":
                    break
        self._note(request, reply)
        return reply

    def _note(self, request: web.Request, reply: web.Response) -> None:
        auth = request.headers.get("Authorization", request.headers.get("X-Omni-Key", ""))
        client = self.clients.get(auth.removeprefix("Bearer ").strip(), "-" if not auth else "other")
        kind = {"/v2/upscale": "submit", "/v2/progress": "poll"}.get(request.path, "other")
        if request.path.startswith("/v2/images/"):
            kind = "image"
        seen = Seen(time.time(), client, kind, reply.status)
        if kind in ("submit", "poll") and reply.content_type == "application/json":
            try:
                doc = orjson.loads(reply.body)
                seen.code, seen.data_null = doc.get("code"), doc.get("data") is None
            except (orjson.JSONDecodeError, AttributeError, TypeError):
                pass
        self.seen.append(seen)


# --- what the clients saw ----------------------------------------------------------------------

@dataclass
class Outcome:
    """One task (or one refused submission) as a client saw it."""

    t: float  # when the client saw the outcome (epoch seconds)
    client: str
    body: str
    result: str  # succeeded, refused, failed (status 3), timed out, error, unfinished
    phase: str  # submit, poll, download
    task_id: str | None = None
    cause: str = ""  # the exception, or the V2 code and msg
    code: int | None = None  # V2 code of a refused submission
    started: float = 0.0  # when the client began (epoch seconds)


def describe(e: BaseException) -> str:
    return f"{type(e).__module__.split('.')[0]}.{type(e).__name__}: {e}"[:300]


def reply_summary(resp) -> dict:
    """The last reply a Python SDK call got: HTTP status, V2 code and msg, whether data was null."""
    summary: dict = {"http": resp.status_code}
    try:
        doc = resp.json()
        summary.update(code=doc.get("code"), msg=str(doc.get("msg", ""))[:200], data_null=doc.get("data") is None)
    except ValueError:
        summary["body"] = resp.text[:120]
    return summary


class PythonUsers:
    """The Python SDK as its users call it: a new task about every `interval` seconds, whatever the
    earlier ones are doing (so that every fault window sees submissions, not only polls), each a
    user of its own: a thread with its own NovitaClient that submits, waits with wait_for_task and
    downloads the images with the SDK's own calls."""

    def __init__(self, base_url: str, image: str, interval: float, outcomes: list[Outcome]) -> None:
        self.base_url, self.image, self.interval, self.outcomes = base_url, image, interval, outcomes
        self.stop = threading.Event()
        self.in_flight: dict[int, list] = {}  # thread id -> [body, task id, started]
        self.thread = threading.Thread(target=self._arrivals, name="python-arrivals", daemon=True)

    def _arrivals(self) -> None:
        for i in itertools.count():
            name, fields = BODIES[i % len(BODIES)]
            threading.Thread(target=self._user, args=(name, fields), daemon=True).start()
            if self.stop.wait(self.interval * random.uniform(0.5, 1.5)):  # users are not in step
                return

    def _user(self, name: str, fields: dict) -> None:
        me = threading.get_ident()
        self.in_flight[me] = [name, None, time.time()]
        try:
            self.outcomes.append(self._task(name, fields, self.in_flight[me]))
        finally:
            del self.in_flight[me]

    def drain(self, seconds: float) -> None:
        """No new tasks; those in flight get `seconds`; the ones still waiting then are reported unfinished."""
        self.stop.set()
        deadline = time.monotonic() + seconds
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.2)
        for name, task_id, started in list(self.in_flight.values()):
            self.outcomes.append(Outcome(time.time(), "python", name, "unfinished", "poll", task_id,
                                         f"still in flight {seconds:g} s after the end of the load", started=started))

    def _task(self, name: str, fields: dict, mine: list) -> Outcome:
        from novita_client import NovitaClient, NovitaTimeoutError, UpscaleRequest
        from novita_client.proto import ProgressResponseStatusCode as Status
        from novita_client.proto import UpscaleResizeMode

        def out(result: str, phase: str, task_id: str | None = None, cause: str = "", code: int | None = None):
            return Outcome(time.time(), "python", name, result, phase, task_id, cause, code, mine[2])

        sdk = NovitaClient(KEYS["python"], base_url=self.base_url)
        last: dict = {}  # the last reply, for the report: the SDK's exceptions don't carry it
        sdk.session.hooks["response"].append(lambda resp, *a, **kw: last.update(reply_summary(resp)))
        mode = UpscaleResizeMode(fields["resize_mode"])
        request = UpscaleRequest(image=self.image, **{**fields, "resize_mode": mode})
        try:
            reply = sdk.upscale(request)
        except Exception as e:  # what the SDK raises: a non-200, a connection error, a parse error
            return out("error", "submit", cause=f"{describe(e)}; last reply {last}")
        if reply.data is None or last.get("code") != 0:
            return out("refused", "submit", cause=f"code {last.get('code')}: {last.get('msg')}", code=last.get("code"))
        task_id = mine[1] = reply.data.task_id
        try:
            done = sdk.wait_for_task(task_id)
        except NovitaTimeoutError as e:
            return out("timed out", "poll", task_id, f"{describe(e)}; last reply {last}")
        except Exception as e:  # e.g. AttributeError on `data: null`, or a non-200
            return out("error", "poll", task_id, f"{describe(e)}; last reply {last}")
        data = done.data
        if data.status is Status.SUCCESSFUL:
            done.download_images()  # the SDK's own download (5 attempts; a failed one is dropped)
            got = data.imgs_bytes or []
            if data.imgs and len(got) == len(data.imgs) and all(b.startswith(PNG_MAGIC) for b in got):
                return out("succeeded", "download", task_id)
            return out("error", "download", task_id, f"{len(got)} of {len(data.imgs or [])} images are PNGs: "
                                                     f"{[bytes(b[:16]) for b in got]}")
        if data.status is Status.FAILED:
            return out("failed", "poll", task_id, data.failed_reason or "")
        return out("timed out", "poll", task_id, f"status {data.status.value}: {data.failed_reason}")


def install_js_sdk() -> str | None:
    """npm-installs the JS SDK into tests/bench/.sdk once; None when it is ready, else why not."""
    if not shutil.which("node") or not shutil.which("npm"):
        return "node or npm is not installed"
    manifest = SDK_DIR / "node_modules" / "novita-sdk" / "package.json"
    want = JS_SDK.rsplit("@", 1)[1]
    if manifest.exists() and json.loads(manifest.read_text()).get("version") == want:
        return None
    SDK_DIR.mkdir(exist_ok=True)
    say(f"npm install {JS_SDK} into {SDK_DIR.relative_to(ROOT)}")
    done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent", JS_SDK], cwd=SDK_DIR,
                          capture_output=True, text=True, timeout=90, env=child_env())
    if done.returncode:
        return f"npm install {JS_SDK} failed: {done.stderr.strip()[-300:]}"
    return None


def js_outcome(rec: dict) -> Outcome:
    """A line of soak_client.js as an Outcome."""
    def out(result: str, cause: str = "", code: int | None = None) -> Outcome:
        return Outcome(rec["t"], "js", rec["body"], result, rec.get("phase", ""), rec.get("task_id"), cause, code,
                       rec.get("started", rec["t"]))

    if rec["outcome"] == "succeeded":
        return out("succeeded")
    if rec["outcome"] != "error":
        return out("error", rec.get("detail", rec["outcome"]))
    code, msg = rec.get("code"), rec.get("msg")
    cause = f"{rec.get('error')} code={code!r} reason={rec.get('reason')!r}: {msg}"[:300]
    if rec.get("ended"):
        return out("unfinished", "still in flight when the run ended")
    if rec.get("timed_out"):
        return out("timed out", f"no final status within {JS_TASK_TIMEOUT} s")
    if rec.get("task_status") == 3:
        return out("failed", msg or "")
    if rec.get("task_status") == 4:
        return out("timed out", f"status 4: {msg}")
    if rec["phase"] == "submit" and rec.get("error") == "NovitaError" and isinstance(code, int) and code > -10:
        return out("refused", f"code {code}: {msg}", code)
    return out("error", cause)


async def run_js(base_url: str, image: str, interval: float, work: Path, stop: asyncio.Event,
                 outcomes: list[Outcome]) -> None:
    """soak_client.js until `stop`; then its tasks in flight get DRAIN seconds."""
    bodies = work / "bodies.json"
    bodies.write_text(json.dumps({"image": image, "bodies": BODIES}))
    with (work / "js-client.log").open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            "node", str(HERE / "soak_client.js"), str(SDK_DIR), base_url, str(bodies), str(interval),
            str(JS_TASK_TIMEOUT), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
            env=child_env(SOAK_API_KEY=KEYS["js"]), start_new_session=True)

    async def read() -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            try:
                outcomes.append(js_outcome(json.loads(line)))
            except (ValueError, KeyError) as e:
                outcomes.append(Outcome(time.time(), "js", "?", "error", "?",
                                        cause=f"unreadable line {line[:100]!r}: {e}"))

    reader = asyncio.create_task(read())
    try:
        await stop.wait()
        assert proc.stdin is not None
        proc.stdin.close()  # no new tasks
        try:
            await asyncio.wait_for(proc.wait(), DRAIN)
        except asyncio.TimeoutError:
            signal_group(proc, signal.SIGTERM)  # it reports what is still in flight as ended, then exits
            await asyncio.wait_for(proc.wait(), 10)
        await reader
    finally:
        if proc.returncode is None:
            signal_group(proc, signal.SIGKILL)
            await proc.wait()
        reader.cancel()


# --- faults ------------------------------------------------------------------------------------

@dataclass
class Window:
    name: str
    start: float
    end: float = float("inf")  # until it is over
    v3: bool = False  # a fault of the upstream (V3) itself


@dataclass
class Faults:
    fake: FakeUpstream
    redis: RedisServer
    replica: Replica
    commit: str  # the proxy's code when the run started
    notes: list[str]  # for the report
    windows: list[Window] = field(default_factory=list)

    def _begin(self, name: str, what: str, v3: bool = False) -> Window:
        say(f"FAULT {name}: {what}")
        window = Window(name, time.time(), v3=v3)
        self.windows.append(window)
        return window

    def _end(self, window: Window, what: str) -> None:
        window.end = time.time()
        say(f"FAULT {window.name} over after {window.end - window.start:.1f} s: {what}")

    async def v3_down(self, seconds: float = 12) -> None:
        w = self._begin("V3 down", f"the fault front's port {self.fake.port} closed, its connections reset", v3=True)
        await self.fake.down()
        await asyncio.sleep(seconds)
        await self.fake.up()
        self._end(w, "listening again on the same port")

    async def v3_fault(self, fault: Fault, name: str, seconds: float = 5) -> None:
        w = self._begin(name, f"every V3 call answered {fault.value}", v3=True)
        self.fake.fault = fault
        await asyncio.sleep(seconds)
        self.fake.fault = Fault.NONE
        self._end(w, "V3 calls relayed again")

    async def redis_restart(self, seconds: float = 3) -> None:
        w = self._begin("Redis restart", f"SHUTDOWN SAVE, redis-server on port {self.redis.port} stopped")
        await asyncio.to_thread(self.redis.stop, True)
        await asyncio.sleep(seconds)
        await asyncio.to_thread(self.redis.start)
        self._end(w, "redis-server started again, same port, same data")

    async def replica_kill(self, seconds: float = 10) -> None:
        w = self._begin(f"{self.replica.name} SIGKILLed", f"kill -9 of {self.replica.name} (port {self.replica.port})")
        self.replica.kill()
        await asyncio.sleep(seconds)
        if (commit := proxy_commit()) != self.commit:  # the proxy changed meanwhile: this replica runs the new one
            self.notes.append(f"{self.replica.name} was started again with the proxy at {commit}.")
        await self.replica.start()
        self._end(w, f"{self.replica.name} started again on port {self.replica.port}, same data dir")

    def schedule(self) -> list[tuple[float, Callable[[], Awaitable[None]]]]:
        """(when, as a fraction of the run; the fault), spaced so that each settles before the next."""
        return [(0.10, self.v3_down),
                (0.27, lambda: self.v3_fault(Fault.BAD_GATEWAY, "V3 502s")),
                (0.40, lambda: self.v3_fault(Fault.RATE_LIMITED, "V3 429s")),
                (0.52, self.redis_restart),
                (0.66, self.replica_kill)]

    async def run(self, seconds: float) -> None:
        for at, fault in self.schedule():
            await asyncio.sleep(max(0.0, T0 + at * seconds - time.time()))
            await fault()

    def where(self, t: float) -> tuple[str, Window | None]:
        """Where `t` fell: during a fault, else in the tail of the one that ended last, else nowhere."""
        if during := [w for w in self.windows if w.start <= t <= w.end]:
            return f"during {during[-1].name} (+{t - during[-1].start:.1f} s into it)", during[-1]
        if after := [w for w in self.windows if w.end < t <= w.end + TAIL]:
            w = max(after, key=lambda w: w.end)
            return f"{t - w.end:.1f} s after {w.name}", w
        return "no fault", None


# --- the report --------------------------------------------------------------------------------

Verdict = tuple[Outcome, str, str]  # the outcome, where it fell, the name of its fault window


def verdicts(outcomes: list[Outcome], faults: Faults) -> tuple[list[Verdict], list[Verdict]]:
    """(counted failures, excused ones)."""
    counted, excused = [], []
    for o in outcomes:
        if o.result == "succeeded":
            continue
        place, window = faults.where(o.t)
        upstream_failed = o.result == "failed" and FAIL_REASON in o.cause
        v3_refused = o.result == "refused" and o.code in RETRY_CODES and window is not None and window.v3
        verdict = (o, place, window.name if window else "no fault")
        (excused if upstream_failed or v3_refused else counted).append(verdict)
    return counted, excused


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def calls_table(lb: Balancer) -> list[str]:
    by = Counter((s.client, s.kind) for s in lb.seen)
    clients = sorted({s.client for s in lb.seen})
    rows = [[c, by[c, "submit"], by[c, "poll"], by[c, "image"], by[c, "other"]] for c in clients]
    return table(["client (key)", "submissions", "polls", "image downloads", "other"], rows)


def tasks_table(outcomes: list[Outcome]) -> list[str]:
    results = ["succeeded", "failed", "timed out", "error", "unfinished", "refused"]
    by = Counter((o.client, o.body, o.result) for o in outcomes)
    rows = [[client, body, *(by[client, body, r] for r in results), task_times(outcomes, client, body)]
            for client in ("python", "js") for body, _ in BODIES if any(by[client, body, r] for r in results)]
    return table(["client", "V2 body", "succeeded", "failed (status 3)", "timed out", "error",
                  "unfinished at end", "refused submissions", "succeeded in p50 / p95 / max"], rows)


def task_times(outcomes: list[Outcome], client: str, body: str) -> str:
    """Submission to image downloaded, of the tasks that succeeded: a stall under a fault shows here."""
    times = sorted(o.t - o.started for o in outcomes if (o.client, o.body, o.result) == (client, body, "succeeded"))
    if not times:
        return "-"
    return " / ".join(f"{times[min(len(times) - 1, int(q * len(times)))]:.1f} s" for q in (0.5, 0.95, 1.0))


def replies_table(lb: Balancer, faults: Faults) -> list[str]:
    """V2 replies per fault window, as the load balancer passed them to the clients."""
    rows: dict[str, Counter] = {}
    for s in lb.seen:
        if s.kind not in ("submit", "poll"):
            continue
        place, window = faults.where(s.t)
        row = rows.setdefault(window.name if window else "no fault", Counter())
        if s.status != 200:
            row[s.kind, f"HTTP {s.status}"] += 1
        else:
            row[s.kind, f"code {s.code}" + (", data null" if s.data_null and s.code else "")] += 1
    order = ["no fault"] + [w.name for w in faults.windows]
    return table(["window (and its tail)", "submissions", "polls"],
                 [[name, _counts(rows[name], "submit"), _counts(rows[name], "poll")] for name in order if name in rows])


def _counts(row: Counter, kind: str) -> str:
    return ", ".join(f"{what}: {n}" for (k, what), n in sorted(row.items(), key=lambda kv: -kv[1]) if k == kind) or "-"


def failure_lines(items: list[Verdict]) -> list[str]:
    return [f"- +{since(o.t):.1f} s, {place}: {o.client} {o.body!r}, {o.result} at {o.phase}"
            f"{f' (task {o.task_id})' if o.task_id else ''}: {o.cause}"
            for o, place, _ in sorted(items, key=lambda i: i[0].t)]


def grouped(items: list[Verdict]) -> list[str]:
    """Failures of one kind in one window counted once (their causes without task ids and numbers)."""
    groups = Counter((window, o.client, o.result, o.phase, _generic(o.cause)) for o, _, window in items)
    return [f"- {n} x {client} {result} at {phase} ({window}): {cause}"
            for (window, client, result, phase, cause), n in sorted(groups.items(), key=lambda kv: -kv[1])]


def _generic(cause: str) -> str:
    """A cause without what differs from one task to the next (task ids, seconds left)."""
    cause = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27,}", "<task>", cause)
    return re.sub(r"\b\d+(\.\d+)? s\b", "N s", cause)


def proxy_commit() -> str:
    """The proxy's code as the replicas load it: its commit, and whether proxy/ differs from it."""
    git = lambda *args: subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" with uncommitted changes in proxy/" if git("status", "--porcelain", "proxy") else "")


def header(a: argparse.Namespace, seconds: float, commit: str, notes: list[str]) -> list[str]:
    """What ran, on what, at which commit of the proxy (read as the replicas started)."""
    m = machine()
    return [f"# Soak with faults: {seconds / 60:g} min, {m['date']}", "",
            f"Proxy at {commit}; {m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']}, aiohttp {m['aiohttp']}. "
            f"Two `serve` replicas on one Redis behind a round-robin load balancer; the V3 emulator (queued "
            f"{EMULATOR['queue_delay']:g} s, processing {EMULATOR['process_delay']:g} s, "
            f"{EMULATOR['fail_rate']:.0%} of jobs failed by it) behind a fault front. Clients: a new task about "
            f"every {a.interval:g} s from each SDK, each task a user of its own: the Python SDK novita-client 0.4.12 "
            f"(upscale, wait_for_task) and the JS SDK {JS_SDK} (upscaleSync). "
            f"`.venv/bin/python -m tests.bench.soak --minutes {a.minutes:g} --interval {a.interval:g}`.", "",
            *(f"- {n}" for n in notes)]


def report(a: argparse.Namespace, lb: Balancer, fake: FakeUpstream, faults: Faults, outcomes: list[Outcome],
           commit: str, notes: list[str], secret: str, seconds: float) -> tuple[list[str], list[str], int]:
    """(the summary, the excused failures one by one, the number of failures that count)."""
    counted, excused = verdicts(outcomes, faults)
    finished = Counter(o.result for o in outcomes)
    by_v3 = sum(1 for o, _, _ in excused if o.result == "failed")
    keys = ", ".join(f"{c} {fingerprint(k, secret.encode())}" for c, k in KEYS.items())
    summary = [
        *header(a, seconds, commit, notes), "",
        "## Faults", "",
        *table(["fault", "from", "to", "length"], [[w.name, f"+{since(w.start):.1f} s", f"+{since(w.end):.1f} s",
                                                    f"{w.end - w.start:.1f} s"] for w in faults.windows]), "",
        "## Calls, as the load balancer passed them", "",
        *calls_table(lb), "",
        f"Key fingerprints, as in the replicas' audit lines: {keys}; `-`: no key (composed images; a direct "
        f"task's images come from V3 itself). Load balancer: {lb.failovers} requests tried on the other replica, "
        f"{sum(1 for s in lb.seen if s.status == 502)} answered 502 by it. V3 calls the replicas made: "
        f"{fake.calls['submit']} submissions, {fake.calls['result']} task results ({sum(fake.faulted.values())} of "
        f"them answered by a fault).", "",
        "## Tasks", "",
        *tasks_table(outcomes), "",
        f"Finished: {finished['succeeded']} succeeded, {finished['failed']} failed ({by_v3} by V3 itself), "
        f"{finished['timed out']} timed out; {finished['unfinished']} unfinished at the end.", "",
        f"## V2 replies in each fault window and its tail ({TAIL:g} s)", "",
        *replies_table(lb, faults), "",
        f"## Client-visible failures the upstream did not cause: {len(counted)}", "",
        *(grouped(counted) or ["none"]), "", *failure_lines(counted), "",
        f"## Excused: V3 failed the job, or refused a submission with a retry code while faulty: {len(excused)}", "",
        *(grouped(excused) or ["none"])]
    return summary, ["", "## Excused, one by one", "", *(failure_lines(excused) or ["none"])], len(counted)


# --- the run -----------------------------------------------------------------------------------

async def ticker(outcomes: list[Outcome], faults: Faults) -> None:
    """A line every 30 s: how it goes."""
    while True:
        await asyncio.sleep(30)
        done = Counter(o.result for o in outcomes)
        counted, _ = verdicts(list(outcomes), faults)
        say(f"so far: {done['succeeded']} succeeded, {done['failed']} failed, {done['refused']} refused "
            f"submissions, {len(counted)} failures the upstream did not cause")


async def soak(a: argparse.Namespace, work: Path) -> int:
    global T0
    seconds = a.minutes * 60
    notes = ["Go: not exercised: no Go V2 SDK is available from the package registries here."]
    image, secret = png_b64(), secrets.token_hex(32)
    outcomes: list[Outcome] = []
    async with AsyncExitStack() as stack:
        redis = RedisServer(shutil.which("redis-server") or "/usr/bin/redis-server", work / "redis")
        await asyncio.to_thread(redis.start)
        stack.callback(redis.stop)

        emu_port = free_port()
        emulator = spawn([str(BIN), "emulator", "--host", "127.0.0.1", "--port", str(emu_port),
                          "--queue-delay", str(EMULATOR["queue_delay"]),
                          "--process-delay", str(EMULATOR["process_delay"]),
                          "--log-format", "json", "--log-level", "warning"],
                         child_env(UPSCALE_PROXY_EMULATOR_FAIL_RATE=str(EMULATOR["fail_rate"]),
                                   UPSCALE_PROXY_EMULATOR_FAIL_REASON=FAIL_REASON, UPSCALE_PROXY_EMULATOR_SEED="7"),
                         work / "emulator.log")
        stack.callback(stop_processes, emulator)
        await wait_port(emu_port)
        fake = await FakeUpstream(f"http://127.0.0.1:{emu_port}").start()
        stack.push_async_callback(fake.close)

        lb_port = free_port()  # the replicas' PUBLIC_URL: composed images are fetched through it
        env = child_env(UPSCALE_PROXY_REDIS_URL=redis.url, UPSCALE_PROXY_FINGERPRINT_SECRET=secret,
                        UPSCALE_PROXY_UPSTREAM=fake.url, UPSCALE_PROXY_IMAGE_HOSTS=f"127.0.0.1:{emu_port}",
                        UPSCALE_PROXY_PUBLIC_URL=f"http://127.0.0.1:{lb_port}", UPSCALE_PROXY_DRAIN_DELAY="0")
        replicas = [Replica(n, env, work) for n in (1, 2)]
        stack.callback(lambda: stop_processes(*(r.proc for r in replicas)))
        commit = proxy_commit()  # others may commit while this runs: the code the replicas load is this one
        await asyncio.gather(*(r.start() for r in replicas))

        lb = await Balancer([r.url for r in replicas], {k: c for c, k in KEYS.items()}, lb_port).start()
        stack.push_async_callback(lb.close)
        say(f"up: redis :{redis.port}, emulator :{emu_port}, fault front :{fake.port}, "
            f"replicas :{replicas[0].port} :{replicas[1].port}, load balancer :{lb.port}; work dir {work}")

        js_missing = "--no-js" if a.no_js else install_js_sdk()
        if js_missing:
            notes.append(f"JS client: NOT RUN ({js_missing}).")
        T0 = time.time()
        say(f"load for {a.minutes:g} min: a new task about every {a.interval:g} s from the Python SDK"
            f"{'' if js_missing else ' and from the JS SDK'}; Go: no Go V2 SDK is available here")
        faults = Faults(fake, redis, replicas[0], commit, notes)
        python = PythonUsers(lb.url, image, a.interval, outcomes)
        python.thread.start()
        stack.callback(python.stop.set)
        stop_js = asyncio.Event()
        js = None if js_missing else asyncio.create_task(run_js(lb.url, image, a.interval, work, stop_js, outcomes))
        tick = asyncio.create_task(ticker(outcomes, faults))
        try:
            await faults.run(seconds)
            await asyncio.sleep(max(0.0, T0 + seconds - time.time()))
            say(f"end of the load: no new tasks; those in flight get {DRAIN:g} s")
            stop_js.set()
            await asyncio.gather(asyncio.to_thread(python.drain, DRAIN), *([js] if js else []))
        finally:
            tick.cancel()
            stop_js.set()
            if js is not None and not js.done():
                js.cancel()
        summary, details, counted = report(a, lb, fake, faults, list(outcomes), commit, notes, secret, seconds)
    out = ROOT / "tests" / "bench" / "results" / f"{datetime.now():%Y%m%d-%H%M%S}-soak.md"
    out.write_text("\n".join(summary + details) + "\n")
    print("\n" + "\n".join(summary), flush=True)
    print(f"\nreport (with the excused failures one by one): {out.relative_to(ROOT)}; logs: {work}")
    return 1 if counted else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=6.5,
                   help="minutes of load, 1.5 to 7 (default 6.5: with the set-up, a first npm install and the "
                        "drain, under 10 min in all)")
    p.add_argument("--interval", type=float, default=0.8,
                   help="seconds between new tasks of each SDK, jittered by +-50%% (default 0.8)")
    p.add_argument("--no-js", action="store_true", help="leave the JS SDK out (it needs node and npm)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, data) even when all went well")
    a = p.parse_args()
    if not 1.5 <= a.minutes <= 7:
        p.error("--minutes must be in [1.5, 7]: the fault schedule needs 1.5, the 10-minute bound allows 7")
    loopback_only()
    logging.getLogger("novita_client").addHandler(logging.NullHandler())  # its errors are in the report
    work = Path(tempfile.mkdtemp(prefix="upscale-soak-"))
    try:
        status = asyncio.run(_main(a, work))
    except KeyboardInterrupt:
        status = 130
    if status == 0 and not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(status)


async def _main(a: argparse.Namespace, work: Path) -> int:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)  # stop everything, as on Ctrl-C
    try:
        async with asyncio.timeout(HARD_LIMIT):
            return await soak(a, work)
    except asyncio.CancelledError:
        print("interrupted: everything started was stopped", file=sys.stderr)
        return 130
    except TimeoutError:
        print(f"stopped after {HARD_LIMIT:g} s, the soak's bound: everything started was stopped", file=sys.stderr)
        return 2


if __name__ == "__main__":
    main()
