"""Real servers on loopback: the V3 emulator, the legacy V2 one, and the proxy in front of them, over HTTP."""

from __future__ import annotations

import io
import json
from collections.abc import Awaitable, Callable, Iterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy import logs
from proxy.app import create_app
from proxy.emulator import EMULATOR, LEGACY_V2, EmulatorSettings, LegacySettings, create_emulator_app, create_legacy_app
from proxy.emulator.app import Emulator
from proxy.settings import Settings
from tests.redis_server import RedisServer, redis_server_binary


class LogLines:
    """What the proxy logged during a test, as parsed JSON lines."""

    def __init__(self) -> None:
        self.stream = io.BytesIO()

    @property
    def text(self) -> str:
        return self.stream.getvalue().decode()

    def __iter__(self):
        return iter(json.loads(line) for line in self.text.splitlines() if line)

    def requests(self) -> list[dict]:
        return [line for line in self if line["event"] == "v2.deprecated_call"]


@pytest.fixture(autouse=True)
def log_lines() -> LogLines:
    lines = LogLines()
    logs.configure("json", "debug", stream=lines.stream, cache=False)
    return lines


@pytest.fixture
def start_emulator(aiohttp_server) -> Callable[..., Awaitable[tuple[TestServer, Emulator]]]:
    """Start a V3 emulator on loopback; fast delays unless overridden."""

    async def start(**overrides) -> tuple[TestServer, Emulator]:
        settings = EmulatorSettings(**{"queue_delay": 0.05, "process_delay": 0.05, **overrides})
        app = create_emulator_app(settings)
        server = await aiohttp_server(app)
        return server, app[EMULATOR]

    return start


@pytest.fixture
def start_proxy(aiohttp_client, tmp_path) -> Callable[..., Awaitable[TestClient]]:
    """A client of the proxy, in front of `upstream` (a URL), its data in the test's tmp_path."""

    async def start(upstream: str, **overrides) -> TestClient:
        # no window for running direct results: a test sees V3's progress as it happens (the
        # poll cache's own tests turn it on)
        settings = Settings(**{"upstream": upstream, "upstream_retry_backoff": 0.01,
                               "data_dir": tmp_path / "data", "poll_cache_seconds": 0, **overrides})
        return await aiohttp_client(create_app(settings))

    return start


@pytest.fixture
async def emulator(start_emulator) -> tuple[TestServer, Emulator]:
    return await start_emulator()


@pytest.fixture
async def legacy(aiohttp_server):
    """The legacy V2 emulator on loopback: (its server, its state)."""
    app = create_legacy_app(LegacySettings(queue_delay=0.05, process_delay=0.05))
    server = await aiohttp_server(app)
    return server, app[LEGACY_V2]


@pytest.fixture
async def proxy(emulator, start_proxy) -> TestClient:
    server, _ = emulator
    return await start_proxy(str(server.make_url("")))


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    """A real redis-server on loopback, one per test module (skipped where it isn't installed,
    failed under CI=true)."""
    server = RedisServer(redis_server_binary(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()
