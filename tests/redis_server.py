"""A real redis-server on a free loopback port, for the Redis stores' tests.

Where redis-server is missing the tests that need it skip; under CI=true that is a failure
(`make test` installs it on Debian when it runs as root).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import free_port


def redis_server_binary() -> str:
    """The path of redis-server; skips the test (fails it under CI=true) when there is none."""
    found = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server")
                                             else None)
    if found:
        return found
    why = "redis-server is not installed (Debian: apt-get install redis-server; `make test` does it as root)"
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


class RedisServer:
    """One redis-server process in `folder`; stop() and start() again keep the port (and, with
    `keep=True`, the data: an outage rather than a new, empty Redis)."""

    def __init__(self, binary: str, folder: Path) -> None:
        self.binary, self.folder, self.port = binary, folder, free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder), "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            try:
                if self._command(b"PING") == b"+PONG":
                    return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self, keep: bool = False) -> None:
        """Stop it; with `keep`, its data is saved first (to `folder`) and loaded by the next start."""
        if self.process is None:
            return
        if keep:
            try:
                self._command(b"SHUTDOWN SAVE")
            except OSError:  # it closes the connection as it exits
                pass
        else:
            self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def _command(self, line: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(line + b"\r\n")
            return s.recv(64).strip()
