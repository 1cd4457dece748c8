"""What the usage store costs (issue 16: at most 3 % of throughput on the small-request and poll
loads): the proxy as shipped against the same proxy with the hot path's counting taken out (its
Tallies' methods do nothing; the flusher then flushes nothing), each alone on CPU $SUT_CPU, in
front of perfkit's fake upstream, measured by perfkit's measure.py, alternately, `--rounds` times.

    .venv/bin/python -m tests.bench.usage [--rounds 3] [--duration 8]

Prints the medians (req/s, CPU µs per request) of each variant and their ratio, and writes them to
tests/bench/results/<date>-usage.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from tests.bench.common import BIN, free_port, wait_port_sync

ROOT = Path(__file__).resolve().parents[2]
KIT = Path(os.environ.get("KIT", ROOT.parent / "shared" / "perfkit"))
SUT_CPU, LOAD_CPU = os.environ.get("SUT_CPU", "1"), os.environ.get("LOAD_CPU", "0")
# the proxy with the hot path's counting taken out: only what the usage store adds differs
WITHOUT = """
import sys
from proxy.usage import tally
tally.Tallies.v2_call = tally.Tallies.v3_call = lambda *args, **kwargs: None
from proxy.cli import main
main(sys.argv[1:])
"""


def start(variant: str, port: int, upstream: str, data: str) -> subprocess.Popen:
    args = ["serve", "--port", str(port), "--upstream", upstream, "--log-format", "json"]
    command = [str(BIN), *args] if variant == "with" else [sys.executable, "-c", WITHOUT, *args]
    env = {**os.environ, "UPSCALE_PROXY_POLL_CACHE_MAX_ENTRIES": "0", "UPSCALE_PROXY_DATA_DIR": data,
           "UPSCALE_PROXY_DRAIN_DELAY": "0"}
    proc = subprocess.Popen(["taskset", "-c", SUT_CPU, *command], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_port_sync(port)
    return proc


def measure(label: str, port: int, pid: int, duration: int, out: Path) -> None:
    env = {**os.environ, "POST_PATH": "/v2/upscale", "GET_PATH": "/v2/progress?task_id=abc", "UNIQUE_IDS": "1",
           "AUTHORIZATION": "Bearer bench-key"}
    subprocess.run([sys.executable, str(KIT / "measure.py"), "--url", f"http://127.0.0.1:{port}", "--label", label,
                    "--loads", "small,get", "--duration", str(duration), "--warmup", "2", "--pid", str(pid),
                    "--load-cpu", LOAD_CPU, "--out", str(out)], env=env, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=8)
    args = p.parse_args()
    if shutil.which("wrk") is None:  # as tests/bench/run.sh does
        subprocess.run("apt-get update -qq && apt-get install -y -qq wrk >/dev/null", shell=True, check=True)
    up_port, port = free_port(), free_port()
    upstream = subprocess.Popen(["taskset", "-c", LOAD_CPU, sys.executable, str(KIT / "upstream.py"),
                                 "--port", str(up_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = Path(tempfile.mkdtemp(prefix="usage-bench-")) / "lines.jsonl"
    try:
        wait_port_sync(up_port)
        for round_ in range(args.rounds):
            for variant in ("with", "without")[:: 1 if round_ % 2 == 0 else -1]:  # neither always first
                with tempfile.TemporaryDirectory() as data:
                    proc = start(variant, port, f"http://127.0.0.1:{up_port}", data)
                    try:
                        measure(variant, port, proc.pid, args.duration, out)
                    finally:
                        proc.terminate()
                        proc.wait(10)
                print(f"round {round_ + 1}/{args.rounds}: {variant} done", flush=True)
    finally:
        upstream.terminate()
        upstream.wait(10)
    report(out)


def report(lines_file: Path) -> None:
    lines = [json.loads(line) for line in lines_file.read_text().splitlines()]
    rows = ["| load | req/s with | req/s without | ratio | CPU µs/req with | without | ratio |",
            "|---|---|---|---|---|---|---|"]
    for load in ("small", "get"):
        got = {v: [x for x in lines if x.get("target") == v and x.get("load") == load] for v in ("with", "without")}
        print(load, {v: [round(x["rps"]) for x in got[v]] for v in got})
        rps = {v: statistics.median(x["rps"] for x in got[v]) for v in got}
        cpu = {v: statistics.median(x["sut_cpu_us_per_req"] for x in got[v]) for v in got}
        rows.append(f"| {load} | {rps['with']:,.0f} | {rps['without']:,.0f} | {rps['with'] / rps['without']:.3f} "
                    f"| {cpu['with']:.0f} | {cpu['without']:.0f} | {cpu['with'] / cpu['without']:.3f} |")
    text = "\n".join([f"# The usage store's cost, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC", "",
                      "Medians of the rounds; the proxy alone on CPU " + SUT_CPU + ", wrk and the upstream on CPU "
                      + LOAD_CPU + ". `without`: the hot path's counting taken out.", "", *rows, ""])
    print(text)
    results = ROOT / "tests" / "bench" / "results" / f"{datetime.now(UTC):%Y%m%d-%H%M%S}-usage.md"
    results.write_text(text)


if __name__ == "__main__":
    main()
