"""Benchmark (not a test): the composed path's own cost.

1. Latency of one composed task from the moment its last V3 job has succeeded to the V2 poll that
   answers with `imgs`: V3 status checks, fetching the V3 images, the local steps (LANCZOS, crop,
   blend) and storing the PNG. The target is 2048 x 2048 with a crop and a blend of two upscalers.
2. The proxy's peak memory while composing 8 such tasks at once, and the latency of the polls
   answered meanwhile (a poll reads the stored task: it must not wait for the compositions).

The emulator (no queue or processing delay) and the proxy run as separate processes. The V3 jobs'
upscales are forced on the emulator first, by polling it directly, so that the timed poll measures
the proxy alone.

    .venv/bin/python -m tests.bench.compose [--runs 5] [--concurrent 8]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp
from PIL import Image

from tests.bench.common import BIN, KEY, free_port, rss_mb, wait_port


def body() -> dict:
    """520 x 600 noise -> cover factor 3.94: one native 4x pass per upscaler (2080 x 2400),
    LANCZOS to 2048 x 2363, crop to 2048 x 2048, blend."""
    rnd = random.Random(1)
    image = Image.frombytes("RGB", (520, 600), rnd.randbytes(520 * 600 * 3))
    buf = io.BytesIO()
    image.save(buf, "PNG", compress_level=1)
    return {"image": base64.b64encode(buf.getvalue()).decode(), "resize_mode": 1,
            "upscaling_resize_w": 2048, "upscaling_resize_h": 2048, "upscaling_crop": True,
            "upscaler_1": "R-ESRGAN 4x+ Anime6B", "upscaler_2": "4x-UltraSharp",
            "extras_upscaler_2_visibility": 0.4}




class Bench:
    def __init__(self, proxy: str, emulator: str, log: Path) -> None:
        self.proxy, self.emulator, self.log = proxy, emulator, log

    def v3_jobs(self, task_id: str) -> list[str]:
        for line in self.log.read_text().splitlines():
            doc = json.loads(line)
            if doc.get("task_id") == task_id and "v3_task_ids" in doc:
                return doc["v3_task_ids"]
        raise LookupError(task_id)

    async def submit(self, http: aiohttp.ClientSession, doc: dict) -> str:
        async with http.post(f"{self.proxy}/v2/upscale", json=doc, headers=KEY) as resp:
            reply = await resp.json()
        assert reply["code"] == 0, reply
        return reply["data"]["task_id"]

    async def settle_v3(self, http: aiohttp.ClientSession, task_id: str) -> None:
        """Poll the emulator directly until every V3 job of the task has succeeded."""
        for _ in range(50):  # the log line is written within the flush interval
            try:
                jobs = self.v3_jobs(task_id)
                break
            except LookupError:
                await asyncio.sleep(0.1)
        for job in jobs:
            while True:
                async with http.get(f"{self.emulator}/v3/async/task-result", params={"task_id": job},
                                    headers=KEY) as resp:
                    if (await resp.json())["task"]["status"] == "TASK_STATUS_SUCCEED":
                        break
                await asyncio.sleep(0.05)

    async def poll_latencies(self, http: aiohttp.ClientSession, ids: list[str], done: asyncio.Event) -> list[float]:
        """Poll the tasks in turn, as fast as answers come, until `done`: each poll's latency, ms."""
        latencies = []
        while not done.is_set():
            for task_id in ids:
                started = time.perf_counter()
                async with http.get(f"{self.proxy}/v2/progress", params={"task_id": task_id}, headers=KEY) as resp:
                    await resp.read()
                latencies.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.01)
        return latencies

    async def poll_done(self, http: aiohttp.ClientSession, task_id: str) -> dict:
        while True:
            async with http.get(f"{self.proxy}/v2/progress", params={"task_id": task_id}, headers=KEY) as resp:
                data = (await resp.json())["data"]
            if data["status"] >= 2:
                assert data["status"] == 2, data
                return data
            await asyncio.sleep(0.005)


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--concurrent", type=int, default=8)
    a = p.parse_args()
    eport, pport = free_port(), free_port()
    work = Path(tempfile.mkdtemp(prefix="compose-bench-"))
    log = work / "proxy.log"
    env = {**os.environ, "UPSCALE_PROXY_DATA_DIR": str(work / "data"), "UPSCALE_PROXY_COMPOSE_MAX_PENDING": "64"}
    emulator = subprocess.Popen([BIN, "emulator", "--port", str(eport), "--queue-delay", "0",
                                 "--process-delay", "0"], stdout=subprocess.DEVNULL, env=env)
    with log.open("wb") as out:
        proxy = subprocess.Popen([BIN, "serve", "--port", str(pport), "--upstream", f"http://127.0.0.1:{eport}",
                                  "--log-format", "json"], stdout=out, env=env)
    try:
        await wait_port(eport)
        await wait_port(pport)
        bench = Bench(f"http://127.0.0.1:{pport}", f"http://127.0.0.1:{eport}", log)
        doc = body()
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            latencies = []
            for _ in range(a.runs + 1):  # the first run warms up
                task_id = await bench.submit(http, doc)
                await bench.settle_v3(http, task_id)
                started = time.perf_counter()
                data = await bench.poll_done(http, task_id)
                latencies.append((time.perf_counter() - started) * 1000)
            async with http.get(data["imgs"][0]) as resp:
                size = Image.open(io.BytesIO(await resp.read())).size
            latencies = latencies[1:]

            ids = [await bench.submit(http, doc) for _ in range(a.concurrent)]
            await asyncio.gather(*(bench.settle_v3(http, task_id) for task_id in ids))
            before = rss_mb(proxy.pid, "VmRSS")
            with open(f"/proc/{proxy.pid}/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            started = time.perf_counter()
            done = asyncio.Event()
            poller = asyncio.create_task(bench.poll_latencies(http, ids, done))
            await asyncio.gather(*(bench.poll_done(http, task_id) for task_id in ids))
            wall = time.perf_counter() - started
            done.set()
            polls = sorted(await poller)
            peak = rss_mb(proxy.pid, "VmHWM")
        print(f"composed task: 520x600 -> 2048x2048 (cover 3.94, crop, blend of 2 upscalers), output {size}")
        print(f"last V3 success -> imgs answer, {a.runs} runs: p50 {statistics.median(latencies):.0f} ms, "
              f"min {min(latencies):.0f} ms, max {max(latencies):.0f} ms")
        print(f"{a.concurrent} compositions at once: {wall:.2f} s wall; proxy RSS {before:.0f} MB before, "
              f"peak {peak:.0f} MB (+{peak - before:.0f} MB)")
        print(f"polls meanwhile: {len(polls)}, p50 {statistics.median(polls):.1f} ms, "
              f"p99 {polls[int(len(polls) * 0.99)]:.1f} ms, max {polls[-1]:.1f} ms")
    finally:
        for proc in (proxy, emulator):
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    asyncio.run(main())
