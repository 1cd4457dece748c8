"""Load test (not a test): many concurrent 4 MB submissions and their polls, against the proxy's limits.

The V3 emulator and the proxy run as separate processes on free loopback ports, the proxy with the
environment of this one (so `UPSCALE_PROXY_MAX_INFLIGHT_MB=64 .venv/bin/python -m tests.bench.load` tries another
budget, `MALLOC_ARENA_MAX=2 ...` another allocator tuning), and the emulator too (so
`UPSCALE_PROXY_EMULATOR_LATENCY=1 UPSCALE_PROXY_MAX_UPSTREAM_CALLS=16 ...` makes V3 slow enough to
hit the cap on calls waiting on it). `--clients` clients each submit a V2 body with a real PNG of
noise (4 MB by default, a 5.3 MB body), poll the task `--polls` times, and go again, until
`--submissions` have been sent or `--duration` seconds have passed. Meanwhile one prober, in its
own process, calls `/healthz` every 50 ms. The emulator keeps its tasks queued, so the polls are
answered while the tasks run and the emulator spends no CPU on upscales.

Reported: submissions/s and polls/s, p50/p99 latency of each, V2 codes (code 5 from load shedding
told apart), `/healthz` latency during the load, and the proxy's RSS (from /proc): idle before the
load, peak, right after and `--settle` seconds after.

    .venv/bin/python -m tests.bench.load [--clients 64] [--submissions 600] [--duration 60] [--settle 60]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import io
import multiprocessing
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path

import aiohttp
import orjson
from PIL import Image

from tests.bench.common import BIN, KEY, free_port, rss_mb, wait_port

SHED = "the proxy is overloaded"  # how a code 5 from the proxy's own limits begins




def body(seed: int, mb: float) -> bytes:
    """A V2 direct-path body (x1.5) around a PNG of RGB noise of about `mb` MB (noise doesn't compress)."""
    side = int((mb * 1_000_000 / 3) ** 0.5)
    image = Image.frombytes("RGB", (side, side), random.Random(seed).randbytes(side * side * 3))
    buf = io.BytesIO()
    image.save(buf, "PNG", compress_level=1)
    return orjson.dumps({"image": base64.b64encode(buf.getvalue()).decode(), "upscaling_resize": 1.5})



def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def shed_latencies(log: Path) -> list[float]:
    """The proxy's own latency (its audit event) of each submission it shed, ms."""
    events = (orjson.loads(line) for line in log.read_bytes().splitlines() if line.startswith(b"{"))
    return [e["latency_ms"] for e in events if e.get("path_taken") == "shed"]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@dataclass
class Tally:
    submit_ms: list[float] = field(default_factory=list)  # accepted submissions (code 0)
    shed_ms: list[float] = field(default_factory=list)  # answered with code 5 by the proxy's limits
    poll_ms: list[float] = field(default_factory=list)
    health_ms: list[float] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)  # "submit 0", "submit 5 (shed)", "poll 0", ...
    sent: int = 0


async def client(http: aiohttp.ClientSession, url: str, bodies: list[bytes], a: argparse.Namespace,
                 tally: Tally, seed: int) -> None:
    rnd = random.Random(seed)
    headers = {**KEY, "Content-Type": "application/json"}
    while tally.sent < a.submissions:
        tally.sent += 1
        started = time.perf_counter()
        try:
            async with http.post(f"{url}/v2/upscale", data=rnd.choice(bodies), headers=headers) as resp:
                reply = await resp.json()
        except (aiohttp.ClientError, TimeoutError) as e:
            tally.codes[f"submit {type(e).__name__}"] += 1
            continue
        ms = (time.perf_counter() - started) * 1000
        shed = reply["code"] == 5 and reply["msg"].startswith(SHED)
        told = " (shed)" if shed else "" if reply["code"] == 0 else f" ({reply['msg'][:60]})"
        tally.codes[f"submit {reply['code']}{told}"] += 1
        if reply["code"] != 0:
            if shed:
                tally.shed_ms.append(ms)
            await asyncio.sleep(rnd.uniform(0.05, 0.2))  # a client backs off a little
            continue
        tally.submit_ms.append(ms)
        for _ in range(a.polls):
            await asyncio.sleep(rnd.uniform(0.5 * a.interval, 1.5 * a.interval))
            started = time.perf_counter()
            async with http.get(f"{url}/v2/progress", params={"task_id": reply["data"]["task_id"]},
                                headers=KEY) as resp:
                code = (await resp.json())["code"]
            tally.poll_ms.append((time.perf_counter() - started) * 1000)
            tally.codes[f"poll {code}"] += 1


def probe_health(url: str, stop: Event, out: Connection) -> None:
    """In its own process (so that the load generator's busy loop doesn't add to what it measures):
    GET /healthz every 50 ms on one keep-alive connection until `stop`; sends the latencies, ms."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    latencies = []
    while not stop.wait(0.05):
        started = time.perf_counter()
        conn.request("GET", "/healthz")
        conn.getresponse().read()
        latencies.append((time.perf_counter() - started) * 1000)
    out.send(latencies)


async def sample_rss(pid: int, peaks: list[float]) -> None:
    while True:
        peaks.append(rss_mb(pid))
        await asyncio.sleep(0.1)


async def metric_lines(http: aiohttp.ClientSession, url: str, prefix: str) -> list[str]:
    async with http.get(f"{url}/metrics") as resp:
        return [line for line in (await resp.text()).splitlines() if line.startswith(prefix)]


def line(name: str, values: list[float], wall: float | None = None) -> str:
    rate = f"{len(values) / wall:7.1f}/s, " if wall else ""
    if not values:
        return f"  {name:<24} none"
    return (f"  {name:<24} {len(values):6d}, {rate}p50 {statistics.median(values):7.1f} ms, "
            f"p99 {pct(values, 0.99):7.1f} ms, max {max(values):7.1f} ms")


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # VmHWM from here on is the peak of what follows


async def load(a: argparse.Namespace, url: str, pid: int, emulator_pid: int, log: Path, bodies: list[bytes]) -> None:
    tally, samples = Tally(), []
    connector = aiohttp.TCPConnector(limit=a.clients + 8)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:
        await client(http, url, bodies[:1], argparse.Namespace(**{**vars(a), "submissions": 2}), Tally(), 0)
        await asyncio.sleep(2)  # the warm-up's memory settles
        idle = rss_mb(pid)
        reset_peak(pid)
        mp = multiprocessing.get_context("spawn")  # not a fork of this busy, threaded process
        stop, (received, sender) = mp.Event(), mp.Pipe(duplex=False)
        prober = mp.Process(target=probe_health, args=(url, stop, sender), daemon=True)
        prober.start()
        sampler = asyncio.create_task(sample_rss(pid, samples))
        cpu = (cpu_seconds(pid), cpu_seconds(emulator_pid), time.process_time())
        started = time.perf_counter()
        clients = [asyncio.create_task(client(http, url, bodies, a, tally, seed)) for seed in range(a.clients)]
        done, pending = await asyncio.wait(clients, timeout=a.duration)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - started
        now = (cpu_seconds(pid), cpu_seconds(emulator_pid), time.process_time())
        cpu = tuple(end - start for start, end in zip(cpu, now, strict=True))
        stop.set()
        tally.health_ms = await asyncio.to_thread(received.recv)
        await asyncio.to_thread(prober.join)
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        errors = [t.exception() for t in done if t.exception()]
        peak, after = rss_mb(pid, "VmHWM"), rss_mb(pid)
        settled: list[tuple[float, float]] = []
        for second in range(10, int(a.settle) + 1, 10):
            await asyncio.sleep(max(0.0, started + wall + second - time.perf_counter()))
            settled.append((second, rss_mb(pid)))
        shed_metric = await metric_lines(http, url, "upscale_proxy_limits_refused_total")
    submits = sum(n for k, n in tally.codes.items() if k.startswith("submit "))
    print(f"load: {a.clients} clients, {tally.sent} submissions sent of {a.submissions}, "
          f"{a.image_mb:g} MB PNG each ({len(bodies[0]) / 1e6:.1f} MB body), {a.polls} polls per "
          f"accepted task; {wall:.1f} s wall{' (cut at --duration)' if pending else ''}")
    print("  proxy settings from the environment: " + (", ".join(
        f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(("UPSCALE_PROXY_", "MALLOC_"))
    ) or "defaults"))
    print(line("submissions accepted", tally.submit_ms, wall))
    print(line("submissions shed (5)", tally.shed_ms, wall))
    print(line("  the same, proxy's own", shed_latencies(log)))
    print(line("polls", tally.poll_ms, wall))
    print(line("/healthz during load", tally.health_ms))
    print(f"  answers: {dict(sorted(tally.codes.items()))} ({submits} submissions answered)")
    if shed_metric:
        print(f"  proxy metric: {' '.join(shed_metric)}")
    print(f"  CPU during the load, share of one core: proxy {cpu[0] / wall:.0%}, emulator {cpu[1] / wall:.0%}, "
          f"load generator {cpu[2] / wall:.0%} ({os.cpu_count()} cores)")
    if errors:
        print(f"  client errors: {errors[:3]}")
    print(f"proxy RSS: idle {idle:.0f} MB, peak {max(peak, *samples, after):.0f} MB, right after {after:.0f} MB, "
          + ", ".join(f"+{s:.0f} s {mb:.0f} MB" for s, mb in settled))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=64, choices=range(1, 513), metavar="1..512")
    p.add_argument("--submissions", type=int, default=600, choices=range(1, 10_001), metavar="1..10000")
    p.add_argument("--duration", type=float, default=60.0, help="seconds the load lasts at most")
    p.add_argument("--polls", type=int, default=3, help="polls of each accepted task")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between a client's polls")
    p.add_argument("--image-mb", type=float, default=4.0, help="size of each PNG")
    p.add_argument("--settle", type=float, default=60.0, help="seconds to watch RSS after the load")
    a = p.parse_args()

    eport, pport = free_port(), free_port()
    work = Path(tempfile.mkdtemp(prefix="load-bench-"))
    env = {"UPSCALE_PROXY_DATA_DIR": str(work / "data"), **os.environ}
    bodies = [body(seed, a.image_mb) for seed in range(4)]
    # the emulator without the allocator tuning under test: it is the proxy's RSS that is measured
    emulator_env = {k: v for k, v in env.items() if not k.startswith("MALLOC_")}
    emulator = subprocess.Popen([BIN, "emulator", "--port", str(eport), "--queue-delay", "3600",
                                 "--log-level", "warning"], stdout=subprocess.DEVNULL, env=emulator_env)
    with (work / "proxy.log").open("wb") as out:
        proxy = subprocess.Popen([BIN, "serve", "--port", str(pport), "--upstream", f"http://127.0.0.1:{eport}",
                                  "--log-format", "json"], stdout=out, env=env)
    try:
        asyncio.run(wait_port(eport))
        asyncio.run(wait_port(pport))
        asyncio.run(load(a, f"http://127.0.0.1:{pport}", proxy.pid, emulator.pid, work / "proxy.log", bodies))
        print(f"emulator RSS at the end: {rss_mb(emulator.pid):.0f} MB")
    finally:
        for proc in (proxy, emulator):
            proc.terminate()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
