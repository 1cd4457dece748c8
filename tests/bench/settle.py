"""Benchmark (not a test): does the proxy give its memory back after a burst of 4 MB submissions?

Starts the proxy pinned to the SUT core (as ../shared/perfkit does), reads its idle RSS, drives 8
concurrent 4 MB V2 submissions (perfkit's `large` body and its wrk.lua, wrk pinned to the load
core) for `--load` seconds, then reads its RSS right after the load and `--settle` seconds later
(sampled every few seconds on the way). Appends one JSON line, target `settle`, to `--out`.

The upstream must already run (perfkit's fake one: tests/bench/run.sh starts it). The proxy gets
this process's environment (so UPSCALE_PROXY_* settings and MALLOC_* tunings reach it).

    .venv/bin/python -m tests.bench.settle --upstream http://127.0.0.1:18080 --out x.jsonl [--settle 60]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.common import BIN, KEY, append_jsonl, free_port, rss_mb, wait_port_sync

ROOT = Path(__file__).resolve().parents[2]


def perfkit(kit: Path):
    """perfkit's measure.py as a module: its body files and its wrk runner."""
    spec = importlib.util.spec_from_file_location("perfkit_measure", kit / "measure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upstream", required=True, help="V3 base URL (perfkit's fake upstream)")
    p.add_argument("--out", help="append the JSON line here")
    p.add_argument("--run", default="")
    p.add_argument("--settle", type=int, default=60, help="seconds to wait after the load (default 60)")
    p.add_argument("--load", type=int, default=10, help="seconds of 4 MB submissions (default 10)")
    p.add_argument("--conc", type=int, default=8)
    p.add_argument("--sut-cpu", default="1", help="taskset CPU list for the proxy")
    p.add_argument("--load-cpu", default="0", help="taskset CPU list for wrk")
    p.add_argument("--kit", type=Path, default=ROOT.parent / "shared" / "perfkit")
    p.add_argument("--body-dir", default="/tmp/perfkit-bodies")
    a = p.parse_args()

    kit = perfkit(a.kit)
    body = kit.body_file(4 * 1024 * 1024, a.body_dir)
    os.environ.setdefault("AUTHORIZATION", KEY["Authorization"])  # wrk.lua sends it
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="settle-bench-"))
    env = {**os.environ}
    env.setdefault("UPSCALE_PROXY_DATA_DIR", str(work / "data"))
    env.setdefault("UPSCALE_PROXY_DRAIN_DELAY", "0")
    with (work / "proxy.log").open("wb") as log:
        proxy = subprocess.Popen(["taskset", "-c", a.sut_cpu, BIN, "serve", "--port", str(port),
                                  "--upstream", a.upstream, "--log-format", "json"],
                                 stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_port_sync(port)
        time.sleep(1)  # whatever it does once started
        idle = rss_mb(proxy.pid)
        started = time.monotonic()
        w = kit.wrk(f"http://127.0.0.1:{port}/v2/upscale", body, a.conc, a.load, a.load_cpu)
        after = rss_mb(proxy.pid)
        peak = rss_mb(proxy.pid, "VmHWM")
        ended = time.monotonic()
        samples = [(0.0, after)]
        while (waited := time.monotonic() - ended) < a.settle:
            time.sleep(min(5.0, a.settle - waited))
            samples.append((round(time.monotonic() - ended, 1), rss_mb(proxy.pid)))
        settled = samples[-1][1]
        rec = {
            "run": a.run, "target": "settle", "load": "large", "conc": a.conc,
            "duration_s": round(w["duration_us"] / 1e6, 2), "requests": w["requests"], "errors": w["errors"],
            "rps": round(w["requests"] / (w["duration_us"] / 1e6), 1), "p50_ms": w["p50_us"] / 1000,
            "load_wall_s": round(ended - started, 1), "settle_s": a.settle,
            "rss_idle_mb": round(idle, 1), "rss_after_load_mb": round(after, 1), "vmhwm_mb": round(peak, 1),
            "rss_settled_mb": round(settled, 1), "rss_settled_minus_idle_mb": round(settled - idle, 1),
            "rss_samples": [[t, round(mb, 1)] for t, mb in samples],
        }
        print(f"{'settle':>12} large c={a.conc:<2} {rec['rps']:>8.0f} req/s  err {w['errors']}  RSS idle {idle:.1f} MB, "
              f"right after {after:.1f} MB (peak {peak:.1f}), {a.settle} s later {settled:.1f} MB "
              f"({settled - idle:+.1f} MB over idle)", flush=True)
        if a.out:
            append_jsonl(a.out, rec)
        else:
            json.dump(rec, sys.stdout)
            print()
    finally:
        proxy.terminate()
        proxy.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
