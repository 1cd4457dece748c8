"""The operator's toolkit around `serve`: --version, the LICENSE, `fingerprint`, the warning about
unknown UPSCALE_PROXY_* variables, the announced URL (port 0, IPv6), colours only on a terminal,
and `serve --workers`. Real processes of `python -m proxy`, with short timeouts."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import proxy
from proxy import logs
from proxy.cli import unknown_variables
from proxy.fingerprint import Fingerprinter, fingerprint
from proxy.metrics import FLUSH_EVERY
from tests.helpers import free_port

ROOT = Path(__file__).parent.parent
KEY = "sk-toolkit-key-0123456789"


def cli(*args: str, env: dict | None = None, stdin: str = "", timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", *args], check=False, input=stdin, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


class Started:
    """A `python -m proxy ...` process whose stdout goes to a file, read as it grows."""

    def __init__(self, proc: subprocess.Popen, out, err) -> None:
        self.proc, self._out, self._err = proc, out, err

    def text(self) -> str:
        self._out.seek(0)
        return self._out.read().decode(errors="replace")

    def stderr(self) -> str:
        self._err.seek(0)
        return self._err.read().decode(errors="replace")

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in self.text().splitlines() if line.startswith("{")]

    def wait_for(self, pattern: str, timeout: float = 20) -> re.Match:
        """Until the output matches `pattern` (lines are flushed within half a second)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := re.search(pattern, self.text()):
                return found
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode}: {self.stderr()}")
            time.sleep(0.05)
        raise AssertionError(f"never logged {pattern!r}: {self.text()} {self.stderr()}")

    def event(self, name: str, timeout: float = 20) -> dict:
        """Until a JSON line with this event is logged: that line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return next(line for line in self.lines() if line.get("event") == name)
            except StopIteration:
                pass
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode}: {self.stderr()}")
            time.sleep(0.05)
        raise AssertionError(f"never logged {name!r}: {self.text()} {self.stderr()}")

    def stop(self, timeout: float = 20) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


@contextmanager
def started(*args: str, env: dict | None = None):
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.TemporaryDirectory(prefix="proxy-data-") as data:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", *args], stdout=out, stderr=err,
                                env={**os.environ, "UPSCALE_PROXY_DATA_DIR": data, "UPSCALE_PROXY_DRAIN_DELAY": "0",
                                     **(env or {})})
        try:
            yield Started(proc, out, err)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def get(url: str) -> tuple[int, dict, bytes]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, dict(resp.headers), resp.read()


# --version, LICENSE

def test__version__prints_the_package_version():
    done = cli("--version")
    assert done.returncode == 0
    assert done.stdout == f"upscale-v2-proxy {proxy.__version__}\n"
    assert proxy.__version__ == metadata.version("upscale-v2-proxy")


def test__license__is_the_mit_text_the_package_declares():
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == "MIT"
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 upscale-v2-proxy contributors\n")
    assert "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND" in text


# fingerprint

def test__fingerprint__uses_the_configured_secret_and_never_echoes_the_key():
    done = cli("fingerprint", stdin=f"  {KEY}\n", env={"UPSCALE_PROXY_FINGERPRINT_SECRET": "s3cret"})
    assert done.returncode == 0, done.stderr
    assert done.stdout == fingerprint(KEY, b"s3cret") + "\n"
    assert KEY not in done.stdout + done.stderr
    bearer = cli("fingerprint", stdin=f"Bearer {KEY}\n", env={"UPSCALE_PROXY_FINGERPRINT_SECRET": "s3cret"})
    assert bearer.stdout == done.stdout  # as an Authorization header is read


def test__fingerprint__is_the_one_the_server_logs_with_the_secret_it_made(tmp_path):
    env = {"UPSCALE_PROXY_DATA_DIR": str(tmp_path)}
    clean = {k: v for k, v in os.environ.items() if k != "UPSCALE_PROXY_FINGERPRINT_SECRET"}
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--emulate-v3", "--port", "0",
                                 "--emulator-port", "0", "--log-format", "json"], stdout=out,
                                stderr=subprocess.DEVNULL, env={**clean, **env, "UPSCALE_PROXY_DRAIN_DELAY": "0"})
        server = Started(proc, out, io.BytesIO())
        try:
            port = server.event("proxy listening")["url"].rsplit(":", 1)[1]
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/progress?task_id=nope",
                                         headers={"Authorization": f"Bearer {KEY}"})
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert json.loads(resp.read())["code"] == 3
            assert server.stop() == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        logged = next(line for line in server.lines() if line["event"] == "v2.deprecated_call")
    done = subprocess.run([sys.executable, "-m", "proxy", "fingerprint"], check=False, input=KEY + "\n", capture_output=True,
                          text=True, timeout=30, env={**clean, **env})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == logged["fingerprint"]


def test__fingerprint__without_a_secret_exits_2_and_makes_none(tmp_path):
    clean = {k: v for k, v in os.environ.items() if k != "UPSCALE_PROXY_FINGERPRINT_SECRET"}
    done = subprocess.run([sys.executable, "-m", "proxy", "fingerprint"], check=False, input=KEY + "\n", capture_output=True,
                          text=True, timeout=30, env={**clean, "UPSCALE_PROXY_DATA_DIR": str(tmp_path)})
    assert done.returncode == 2
    assert "UPSCALE_PROXY_FINGERPRINT_SECRET" in done.stderr and "UPSCALE_PROXY_DATA_DIR" in done.stderr
    assert "first start" in done.stderr and KEY not in done.stderr + done.stdout
    assert list(tmp_path.iterdir()) == []


def test__fingerprint__of_no_key_exits_2():
    done = cli("fingerprint", stdin="\n", env={"UPSCALE_PROXY_FINGERPRINT_SECRET": "s3cret"})
    assert done.returncode == 2 and "no key" in done.stderr and not done.stdout


# unknown variables

def test__unknown_variables__are_named_with_the_closest_setting():
    found = dict(unknown_variables({
        "UPSCALE_PROXY_PROT": "1", "UPSCALE_PROXY_PORT": "1", "UPSCALE_PROXY_EMULATOR_QUEUE_DELAY": "0",
        "UPSCALE_PROXY_EMULATOR_QUEUE_DELEY": "0", "UPSCALE_PROXY_POLICY_CROP": "strict",
        "UPSCALE_PROXY_ZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZ": "1", "HOME": "/"}))
    assert found == {"UPSCALE_PROXY_PROT": "UPSCALE_PROXY_PORT",
                     "UPSCALE_PROXY_EMULATOR_QUEUE_DELEY": "UPSCALE_PROXY_EMULATOR_QUEUE_DELAY",
                     "UPSCALE_PROXY_ZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZ": None}


@pytest.mark.parametrize("command", [["serve"], ["emulator"]])
def test__unknown_variable__is_warned_about_at_start_up(command):
    with started(*command, "--port", "0", "--log-format", "json",
                 env={"UPSCALE_PROXY_UPSTREAM_TIMEOUTS": "5", "UPSCALE_PROXY_EMULATOR_LATENCCY": "1"}) as proc:
        proc.wait_for(r"listening")
        assert proc.stop() == 0
        warnings = {line["variable"]: line.get("did_you_mean") for line in proc.lines()
                    if line["event"] == "unknown setting, ignored"}
    assert warnings == {"UPSCALE_PROXY_UPSTREAM_TIMEOUTS": "UPSCALE_PROXY_UPSTREAM_TIMEOUT",
                        "UPSCALE_PROXY_EMULATOR_LATENCCY": "UPSCALE_PROXY_EMULATOR_LATENCY"}


# the announced URL; colours

@pytest.mark.parametrize("command", [["serve"], ["emulator"]])
def test__port_0__announces_the_port_bound(command):
    with started(*command, "--port", "0", "--log-format", "json") as proc:
        url = proc.event("proxy listening" if command == ["serve"] else "emulator listening")["url"]
        host, port = url.rsplit(":", 1)
        assert host == "http://127.0.0.1" and int(port) != 0
        if command == ["serve"]:
            assert get(f"{url}/healthz")[0] == 200
        else:
            with socket.create_connection(("127.0.0.1", int(port)), timeout=5):
                pass
        assert proc.stop() == 0


def _ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6(), reason="no IPv6 loopback here")
def test__ipv6_host__is_announced_in_brackets():
    with started("serve", "--host", "::1", "--port", "0", "--log-format", "json") as proc:
        url = proc.event("proxy listening")["url"]
        assert re.fullmatch(r"http://\[::1\]:[1-9]\d*", url)
        assert get(f"{url}/healthz")[0] == 200
        assert proc.stop() == 0


def test__console_logs_to_a_file__have_no_colour_codes():
    with started("serve", "--port", "0", "--log-format", "console") as proc:
        proc.wait_for(r"proxy listening")
        assert proc.stop() == 0
        text = proc.text()
    assert "proxy listening" in text and "\x1b[" not in text


class _Terminal(io.BytesIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("stream", "colours"), [(io.BytesIO, False), (_Terminal, True)])
def test__console_renderer__colours_only_a_terminal(stream, colours):
    out = stream()
    try:
        logs.configure("console", "info", stream=out, cache=False)
        import structlog

        structlog.get_logger("t").info("hello", field=1)
        assert ("\x1b[" in out.getvalue().decode()) is colours
        assert "hello" in out.getvalue().decode()
    finally:
        logs.configure("json", "info", stream=io.BytesIO(), cache=False)


# serve --workers

def test__workers_2__share_one_port_and_sigterm_drains_them_all():
    port = free_port()
    with started("serve", "--workers", "2", "--emulate-v3", "--port", str(port), "--emulator-port", "0",
                 "--log-format", "json") as proc:
        parent = proc.event("workers started")
        assert len(parent["workers"]) == 2 and parent["url"] == f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while len([line for line in proc.lines() if line["event"] == "proxy listening"]) < 2:
            assert time.monotonic() < deadline and proc.proc.poll() is None, proc.text() + proc.stderr()
            time.sleep(0.05)
        for i in range(60):  # a new connection each: the kernel spreads them over the workers
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/progress?task_id=unknown-{i}",
                                         headers={"Authorization": f"Bearer {KEY}"})
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert json.loads(resp.read())["code"] == 3
        # whichever worker answers: all of them, the other workers' counts as of their last flush
        # (every metrics.FLUSH_EVERY seconds)
        total = 'upscale_proxy_v2_calls_total{code="3",endpoint="progress",path="direct"} 60.0'
        deadline = time.monotonic() + 3 * FLUSH_EVERY
        while total not in (metrics := get(f"http://127.0.0.1:{port}/metrics")[2].decode()):
            assert time.monotonic() < deadline, metrics
            time.sleep(0.1)
        assert proc.stop() == 0, proc.stderr()
        lines = proc.lines()
    served = {line["pid"] for line in lines if line["event"] == "v2.deprecated_call"}
    assert served == set(parent["workers"])
    assert len([line for line in lines if line["event"] == "stopped" and line.get("pid") in served]) == 2
    assert lines[-1]["event"] == "stopped" and lines[-1]["pid"] == proc.proc.pid


def test__workers__on_a_port_in_use_exit_2():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with tempfile.TemporaryDirectory() as data:
            done = cli("serve", "--workers", "2", "--port", str(port), env={"UPSCALE_PROXY_DATA_DIR": data})
    assert done.returncode == 2 and "address already in use" in done.stderr


@settings(max_examples=60, deadline=None)
@given(key=st.text(min_size=1, max_size=300), secret=st.binary(max_size=200))
def test__fingerprinter__is_the_same_hmac_as_the_one_shot(key, secret):
    """The edge's precomputed HMAC (any key, any secret length: a secret longer than SHA-256's
    block is hashed first) gives what `fingerprint` and the `fingerprint` command give."""
    assert Fingerprinter(secret)(key) == fingerprint(key, secret)
