"""The console script as a user runs it: real processes, a legacy-style synchronous client."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager

import pytest

from tests.helpers import free_port
from tests.images import decode, encode, pattern

KEY = "sk-legacy-client-key"


class Process:
    output = ""  # its stdout, once it has stopped


@contextmanager
def running(*args: str, port: int, env: dict | None = None):
    """Run `python -m proxy ARGS` until the block ends, then stop it gracefully (SIGTERM)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        data = tempfile.mkdtemp(prefix="proxy-data-")
        proc = subprocess.Popen([sys.executable, "-m", "proxy", *args], stdout=out, stderr=err,
                                env={**os.environ, "UPSCALE_PROXY_DATA_DIR": data,
                                     "UPSCALE_PROXY_DRAIN_DELAY": "0", **(env or {})})
        result = Process()
        try:
            for _ in range(200):
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                if proc.poll() is not None:
                    err.seek(0)
                    raise AssertionError(err.read().decode())
                time.sleep(0.05)
            yield result
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            out.seek(0)
            result.output = out.read().decode()
            shutil.rmtree(data)


class LegacyClient:
    """What old SDKs do: raise on any non-200, require the V2 fields, poll every half second."""

    def __init__(self, base: str, headers: dict) -> None:
        self.base, self.headers = base, headers

    def call(self, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data, {**self.headers, "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:  # raises on any non-2xx
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}")
            return json.loads(resp.read())

    def upscale_and_wait(self, body: dict) -> dict:
        reply = self.call("/v2/upscale", body)
        if reply["code"] != 0:
            raise RuntimeError(reply["msg"])
        while True:
            progress = self.call(f"/v2/progress?task_id={reply['data']['task_id']}")
            if progress["code"] != 0:
                raise RuntimeError(progress["msg"])
            data = progress["data"]
            status, _, _ = data["status"], data["progress"], data["eta_relative"]  # KeyError = SDK crash
            if status == 2:
                return data
            if status in (3, 4):
                raise RuntimeError(data["failed_reason"])
            time.sleep(0.5)


def test__serve_emulate_v3__legacy_client_submits_polls_and_downloads():
    port, emulator_port = free_port(), free_port()
    with running("serve", "--emulate-v3", "--port", str(port), "--emulator-port", str(emulator_port),
                 port=port) as proc:
        client = LegacyClient(f"http://127.0.0.1:{port}", {"X-Omni-Key": KEY})
        image = base64.b64encode(encode(pattern(120, 80), "JPEG")).decode()
        data = client.upscale_and_wait({"image": image, "upscaler_1": "R-ESRGAN 4x+ Anime6B",
                                        "resize_mode": 0, "upscaling_resize": 3})
        with urllib.request.urlopen(data["imgs"][0], timeout=10) as resp:
            assert decode(resp.read()).size == (360, 240)
        composed = client.upscale_and_wait({
            "image": image, "upscaler_1": "R-ESRGAN 4x+", "resize_mode": 1, "upscaling_resize_w": 300,
            "upscaling_resize_h": 300, "upscaling_crop": True, "upscaler_2": "Lanczos",
            "extras_upscaler_2_visibility": 0.5, "img_expire_ttl": 7200})
        assert composed["imgs"][0].startswith(f"http://127.0.0.1:{port}/v2/images/")
        with urllib.request.urlopen(composed["imgs"][0], timeout=10) as resp:
            assert decode(resp.read()).size == (300, 300)
        refused = LegacyClient(f"http://127.0.0.1:{port}", {}).call("/v2/upscale", {"image": image})
        assert refused["code"] == 4
    out = proc.output  # after a graceful stop, which flushes the log
    lines = [json.loads(line) for line in out.splitlines()]  # JSON lines: stdout is not a terminal
    assert any(line["event"] == "proxy listening" for line in lines)
    requests = [line for line in lines if line["event"] == "v2.deprecated_call"]
    assert requests[0]["path"] == "/v2/upscale" and requests[0]["v2_code"] == 0
    assert requests[-1]["v2_code"] == 4
    assert KEY not in out


def test__emulator_command__serves_v3():
    port = free_port()
    with running("emulator", "--port", str(port), "--queue-delay", "0", port=port,
                 env={"UPSCALE_PROXY_EMULATOR_API_KEYS": f"{KEY},other"}):
        body = {"request": {"model_name": "4x-UltraSharp", "scale_factor": 2,
                            "image_base64": base64.b64encode(encode(pattern(8, 8), "PNG")).decode()}}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v3/async/upscale", json.dumps(body).encode(),
                                     {"Authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert json.loads(resp.read())["task_id"]


@pytest.mark.parametrize(("args", "env", "named"), [
    (["serve", "--port", "70000"], {}, "UPSCALE_PROXY_PORT"),
    (["serve"], {"UPSCALE_PROXY_UPSTREAM": "ftp://example"}, "UPSCALE_PROXY_UPSTREAM"),
    (["serve"], {"UPSCALE_PROXY_UPSTREAM_TIMEOUT": "-1"}, "UPSCALE_PROXY_UPSTREAM_TIMEOUT"),
    (["emulator"], {"UPSCALE_PROXY_EMULATOR_ERROR_RATE": "2"}, "UPSCALE_PROXY_EMULATOR_ERROR_RATE"),
    (["serve"], {"UPSCALE_PROXY_DEPRECATION_DATE": "2025-01-01T00:00:00Z",
                 "UPSCALE_PROXY_SUNSET_DATE": "2024-12-31T00:00:00Z"}, "UPSCALE_PROXY_SUNSET_DATE"),
    (["serve"], {"UPSCALE_PROXY_BROWNOUTS": '[{"start": "2026-02-01T00:00:00Z", "end": "2026-01-01T00:00:00Z"}]'},
     "UPSCALE_PROXY_BROWNOUTS"),
    (["serve"], {"UPSCALE_PROXY_POLICY_CROP": "sometimes"}, "UPSCALE_PROXY_POLICY_CROP"),
])
def test__bad_setting__stops_start_up_naming_it(args, env, named):
    proc = subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=30)
    assert proc.returncode == 2
    assert named in proc.stderr and "Traceback" not in proc.stderr


def test__port_in_use__stops_start_up_with_a_clear_message():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with tempfile.TemporaryDirectory() as data:
            proc = subprocess.run([sys.executable, "-m", "proxy", "serve", "--port", str(port)], capture_output=True,
                                  text=True, timeout=30, env={**os.environ, "UPSCALE_PROXY_DATA_DIR": data})
    assert proc.returncode == 2
    assert "cannot start" in proc.stderr and "address already in use" in proc.stderr
    assert "Traceback" not in proc.stderr
