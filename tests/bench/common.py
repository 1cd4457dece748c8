"""What the benchmark scripts share: the key they send, the console script, loopback ports, RSS."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

KEY = {"Authorization": "Bearer bench-key"}
BIN = Path(sys.executable).with_name("upscale-v2-proxy")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_port(port: int) -> None:
    """Until a server listens on the loopback port; exits the script if none ever does."""
    for _ in range(100):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise SystemExit(f"port {port} never opened")


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    """A process's resident memory (or its peak, `VmHWM`), in MB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def wait_port_sync(port: int, seconds: float = 10.0) -> None:
    """wait_port for scripts without an event loop."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"port {port} never opened")


def append_jsonl(path: str | Path, record: dict) -> None:
    """One JSON line appended to a results file (tests/bench/results/<run>.jsonl)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def machine() -> dict:
    """What the bench ran on: CPUs, kernel, and the versions that matter to its numbers."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "none"

    try:
        lscpu = subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout
        model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                      if line.startswith("Model name:")), "unknown")
    except OSError:
        model = "unknown"
    return {"nproc": len(os.sched_getaffinity(0)), "cpu_model": model, "kernel": platform.release(),
            "python": platform.python_version(), "aiohttp": ver("aiohttp"), "uvloop": ver("uvloop"),
            "date": datetime.now(UTC).astimezone().isoformat(timespec="seconds")}
