"""Benchmark (not a test): V3 calls per V2 poll on the direct path, as legacy SDKs poll.

N clients each submit a small PNG, then poll their own task every `--interval` seconds until it is
done. The emulator keeps tasks queued, then processing, for a few seconds. The report is the V3
`task-result` calls per V2 poll (target: 0.5 or fewer) and the poll latency seen by the clients.

The proxy runs as its own process, with the environment of this one (so
UPSCALE_PROXY_POLL_CACHE_SECONDS=0 measures the proxy without its fresh window). The emulator runs
in this process, which is how its calls are counted. Everything is on loopback, bounded by
`--clients` and `--deadline`.

    .venv/bin/python -m tests.bench.polls [--clients 50] [--interval 0.5] [--pace fixed|after-reply]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from PIL import Image

from proxy.emulator import EMULATOR, EmulatorSettings, create_emulator_app
from tests.bench.common import BIN, KEY, free_port, wait_port


def png_b64(seed: int) -> str:
    image = Image.frombytes("RGB", (32, 32), random.Random(seed).randbytes(32 * 32 * 3))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()



async def client(http: aiohttp.ClientSession, proxy: str, seed: int, a: argparse.Namespace,
                 latencies: list[float]) -> int:
    """Submit one task, poll it until done; the final V2 status."""
    async with http.post(f"{proxy}/v2/upscale", json={"image": png_b64(seed), "upscaling_resize": 2},
                         headers=KEY) as resp:
        reply = await resp.json()
    assert reply["code"] == 0, reply
    task_id = reply["data"]["task_id"]
    await asyncio.sleep(random.Random(seed).uniform(0, a.interval))  # clients are not in step
    start = time.perf_counter()
    for n in range(1, 10_000):
        started = time.perf_counter()
        async with http.get(f"{proxy}/v2/progress", params={"task_id": task_id}, headers=KEY) as resp:
            data = (await resp.json())["data"]
        latencies.append(time.perf_counter() - started)
        if data["status"] >= 2:
            return data["status"]
        # fixed: a poll every interval, as a timer would; after-reply: sleep(interval) after each answer
        pause = start + n * a.interval - time.perf_counter() if a.pace == "fixed" else a.interval
        await asyncio.sleep(max(pause, 0))
    raise AssertionError("unreachable")


async def metric(http: aiohttp.ClientSession, proxy: str, prefix: str) -> str:
    async with http.get(f"{proxy}/metrics") as resp:
        return " ".join(line for line in (await resp.text()).splitlines() if line.startswith(prefix))


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=50, choices=range(1, 501), metavar="1..500")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between a client's polls")
    p.add_argument("--pace", choices=["fixed", "after-reply"], default="fixed")
    p.add_argument("--queue-delay", type=float, default=1.0)
    p.add_argument("--process-delay", type=float, default=4.0)
    p.add_argument("--deadline", type=float, default=120.0, help="seconds before the run gives up")
    a = p.parse_args()

    emulator = create_emulator_app(EmulatorSettings(host="127.0.0.1", port=0, queue_delay=a.queue_delay,
                                                    process_delay=a.process_delay))
    runner = web.AppRunner(emulator, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    eport, pport = runner.addresses[0][1], free_port()
    work = Path(tempfile.mkdtemp(prefix="polls-bench-"))
    env = {**os.environ, "UPSCALE_PROXY_DATA_DIR": str(work / "data")}
    proxy = subprocess.Popen([BIN, "serve", "--port", str(pport), "--upstream", f"http://127.0.0.1:{eport}",
                              "--log-format", "json", "--log-level", "warning"], stdout=subprocess.DEVNULL, env=env)
    try:
        await wait_port(pport)
        url = f"http://127.0.0.1:{pport}"
        latencies: list[float] = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            started = time.perf_counter()
            async with asyncio.timeout(a.deadline):
                statuses = await asyncio.gather(*(client(http, url, seed, a, latencies) for seed in range(a.clients)))
            wall = time.perf_counter() - started
            outcomes = await metric(http, url, "upscale_proxy_poll_cache_total")
        calls = emulator[EMULATOR].requests["result"]
        polls = len(latencies)
        ms = sorted(x * 1000 for x in latencies)
        print(f"{a.clients} direct tasks ({a.queue_delay:g} s queued, {a.process_delay:g} s processing), "
              f"polled every {a.interval:g} s ({a.pace}); {wall:.1f} s wall; "
              f"final statuses {sorted(set(statuses))}; UPSCALE_PROXY_POLL_CACHE_SECONDS="
              f"{os.environ.get('UPSCALE_PROXY_POLL_CACHE_SECONDS', 'default')}")
        print(f"V2 polls {polls}, V3 task-result calls {calls}: {calls / polls:.3f} V3 calls per poll (target <= 0.5)")
        print(f"poll latency: p50 {statistics.median(ms):.2f} ms, p99 {ms[int(0.99 * (polls - 1))]:.2f} ms, "
              f"max {ms[-1]:.2f} ms")
        print(f"proxy: {outcomes}")
    finally:
        proxy.terminate()
        proxy.wait()
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
