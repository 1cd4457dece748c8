"""What the benchmark scripts share: the key they send, the console script, loopback ports, RSS."""

from __future__ import annotations

import asyncio
import socket
import sys
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
