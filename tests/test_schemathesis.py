"""Schemathesis against the OpenAPI document, with the real proxy (and its built-in V3 emulator) on
loopback: generated requests to every documented operation get no 5xx and replies that conform."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

from tests.helpers import AUTH, free_port

DOC = json.loads((Path(__file__).parent.parent / "proxy" / "openapi.json").read_text())
SCHEMA = schemathesis.openapi.from_dict(DOC).exclude(
    path_regex=r"^/v3/|^/_proxy/webhooks/",  # the pass-through is V3's own surface; webhooks are off
)


# No 5xx, and status, content type, headers and body as documented. Not the checks that expect a
# 4xx for bad input or a 401 without a key: V2 answers every call with HTTP 200 and a V2 `code`
# (legacy SDKs raise on any other status), and the document says so.
CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_headers_conformance, checks.response_schema_conformance]


@pytest.fixture(scope="module")
def live_proxy(tmp_path_factory) -> str:
    """`serve --emulate-v3` as a process of its own: schemathesis makes blocking calls."""
    port, emulator_port = free_port(), free_port()
    env = {**os.environ, "UPSCALE_PROXY_DATA_DIR": str(tmp_path_factory.mktemp("data")),
           "UPSCALE_PROXY_DRAIN_DELAY": "0", "UPSCALE_PROXY_EMULATOR_QUEUE_DELAY": "0",
           "UPSCALE_PROXY_EMULATOR_PROCESS_DELAY": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--emulate-v3", "--port", str(port),
                             "--emulator-port", str(emulator_port), "--log-format", "json"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"{base}/healthz", timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@SCHEMA.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])
def test__every_operation__answers_generated_requests_without_5xx_and_as_documented(case, live_proxy):
    case.call_and_validate(base_url=live_proxy, headers=AUTH, checks=CHECKS)
