"""create_app(settings) -> web.Application: wiring only (routes, middleware, long-lived resources)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import structlog
import yarl
from aiohttp import web

from proxy import __version__, logs, mappings, ops
from proxy.compose.fetch import ImageFetcher
from proxy.compose.tasks import Composer, ComposerSettings
from proxy.deprecation import Brownouts, Deprecation
from proxy.emulator import EmulatorSettings, create_emulator_app
from proxy.fingerprint import load_secret
from proxy.metrics import Metrics
from proxy.middleware import v2_edge
from proxy.settings import Settings
from proxy.keys import (BROWNOUTS, COMPOSER, DEPRECATION, MAPPINGS, METRICS, POLICIES, READINESS, SECRET,
                         SESSION, SETTINGS, UPSTREAM_URL, V3, Readiness)
from proxy.stores import FileResultStore, SqlitePlanStore
from proxy.v2 import handlers as v2
from proxy.v3.client import V3Client
from proxy.v3.passthrough import passthrough

MiB = 1024 * 1024
log = structlog.get_logger("proxy")


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v2/upscale", v2.upscale, name="upscale")
    app.router.add_get("/v2/progress", v2.progress, name="progress")
    app.router.add_get(r"/v2/images/{task_id}.png", v2.image, name="images")
    app.router.add_route("*", "/v3/{tail:.*}", passthrough, name="v3")
    app.router.add_post("/_proxy/translate", ops.translate)
    app.router.add_get("/_proxy/guide", ops.guide)
    app.router.add_get("/healthz", ops.healthz)
    app.router.add_get("/readyz", ops.readyz)
    app.router.add_get("/metrics", ops.metrics)


def embedded_emulator(settings: EmulatorSettings) -> Callable[[web.Application], AsyncIterator[None]]:
    """`serve --emulate-v3`: the V3 emulator on its own port in this process, used as the upstream."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        runner = web.AppRunner(create_emulator_app(settings), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, settings.host, settings.port).start()
        port = runner.addresses[0][1]
        app[UPSTREAM_URL] = str(yarl.URL.build(scheme="http", host=settings.host, port=port))
        log.info("emulator listening", url=app[UPSTREAM_URL])
        yield
        await runner.cleanup()

    return ctx


async def upstream_client(app: web.Application) -> AsyncIterator[None]:
    """One pooled ClientSession for the app's lifetime, with explicit timeouts."""
    s = app[SETTINGS]
    timeout = aiohttp.ClientTimeout(total=s.upstream_timeout, connect=s.upstream_connect_timeout)
    connector = aiohttp.TCPConnector(limit=s.upstream_max_connections)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, headers={"User-Agent": f"upscale-v2-proxy/{__version__}"},
    ) as session:
        app[SESSION] = session
        app[V3] = V3Client(session, app[UPSTREAM_URL], app[MAPPINGS].errors, retries=s.upstream_retries,
                           backoff=s.upstream_retry_backoff, observe=app[METRICS].observe_upstream)
        yield


async def composer(app: web.Application) -> AsyncIterator[None]:
    """The composed path: stores under the data directory, a bounded thread pool, the sweeper."""
    s = app[SETTINGS]
    s.data_dir.mkdir(parents=True, exist_ok=True)
    app[SECRET] = load_secret(s.fingerprint_secret and s.fingerprint_secret.get_secret_value(), s.data_dir)
    plans = SqlitePlanStore(s.data_dir / "tasks.sqlite3")
    hosts = frozenset(h.lower() for h in [yarl.URL(app[UPSTREAM_URL]).host or "", *s.image_hosts])
    if not s.emulate_v3 and not s.image_hosts:
        log.warning("composed tasks can fetch V3 images from the upstream's host only; "
                    "set UPSCALE_PROXY_IMAGE_HOSTS to the host of V3's image URLs", allowed=sorted(hosts))
    fetcher = ImageFetcher(app[SESSION], hosts, s.image_max_mb * MiB, s.image_fetch_timeout,
                           observe=app[METRICS].observe_upstream)
    with ThreadPoolExecutor(s.compose_workers, thread_name_prefix="compose") as executor:
        app[COMPOSER] = Composer(
            app[V3], plans, FileResultStore(s.data_dir / "results"), fetcher, executor,
            ComposerSettings(deadline=s.compose_deadline, lease=60.0, max_pending=s.compose_max_pending),
            on_state=lambda state: app[METRICS].composed_tasks.labels(state).inc(),
        )

        async def sweep() -> None:
            while True:
                await asyncio.sleep(s.sweep_interval)
                try:
                    if removed := await app[COMPOSER].sweep(time.time()):
                        log.info("swept expired tasks", count=removed)
                except Exception:
                    log.exception("sweep failed")

        sweeper = asyncio.create_task(sweep())
        yield
        sweeper.cancel()
        await plans.close()


def create_app(settings: Settings | None = None, emulator: EmulatorSettings | None = None) -> web.Application:
    """The proxy. With `settings.emulate_v3`, the emulator (`emulator` settings) is its upstream."""
    settings = settings or Settings()
    app = web.Application(middlewares=[v2_edge], client_max_size=settings.max_body_mb * MiB)
    app[SETTINGS] = settings
    app[MAPPINGS] = mappings.load()
    app[POLICIES] = settings.policies()
    app[METRICS] = Metrics(settings.metrics_max_clients)
    app[DEPRECATION] = Deprecation(settings)
    app[BROWNOUTS] = Brownouts(settings.brownouts, settings.sunset_date, settings.deprecation_link)
    app[READINESS] = Readiness()
    app[UPSTREAM_URL] = settings.upstream
    app.cleanup_ctx.append(logs.flush_periodically)
    if settings.emulate_v3:
        app.cleanup_ctx.append(embedded_emulator(emulator or EmulatorSettings()))
    app.cleanup_ctx.append(upstream_client)
    app.cleanup_ctx.append(composer)
    app.on_startup.append(_ready)  # after every cleanup_ctx has started
    app.on_shutdown.append(_draining)
    setup_routes(app)
    return app


async def _ready(app: web.Application) -> None:
    app[READINESS].state = "ready"


async def _draining(app: web.Application) -> None:
    app[READINESS].state = "draining"
