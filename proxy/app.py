"""create_app(settings) -> web.Application: wiring only (routes, the ordered V2 edge units, one
cleanup_ctx per long-lived resource)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING

import aiohttp
import structlog
import yarl
from aiohttp import web

from proxy import __version__, dashboard, logs, mappings, metrics, ops, webhooks
from proxy.compose.engine import EngineSettings, TaskEngine
from proxy.compose.faces import NO_FACES, A1111FaceRestorer
from proxy.compose.fetch import AllowedOrigins, ImageFetcher
from proxy.dashboard import api as usage_api
from proxy.dashboard import pages
from proxy.deprecation import Brownouts, Deprecation
from proxy.fingerprint import Fingerprinter, load_secret
from proxy.keys import (
    BROWNOUTS,
    DEPRECATION,
    DIRECT,
    EXECUTOR,
    FINGERPRINT,
    LAST_KNOWN,
    LEGACY,
    MAPPINGS,
    METRICS,
    MIGRATION,
    MIGRATION_STORE,
    READINESS,
    RESULTS,
    ROUTER,
    SECRET,
    SESSION,
    SETTINGS,
    SHARED_RESULTS,
    TASK_STORE,
    TASKS,
    TRANSLATOR,
    UPSTREAM_URL,
    USAGE,
    V3,
    WEBHOOKS,
    Readiness,
)
from proxy.limits import LIMITS, Limits, keep_freed_memory, trim_memory
from proxy.metrics import Metrics
from proxy.migration.compare import Thresholds
from proxy.migration.health import Health, HealthSettings
from proxy.migration.legacy import LegacyV2
from proxy.migration.router import Router
from proxy.migration.service import Migration
from proxy.migration.shadow import Shadows, ShadowSettings
from proxy.migration.stages import Rules
from proxy.migration.store import RedisMigrationStore, SqliteMigrationStore
from proxy.settings import Settings
from proxy.stores import FileResultStore, SqliteTaskStore
from proxy.usage.service import USAGE_FLUSH_EVERY, Usage
from proxy.usage.stores import RedisUsageStore, SqliteUsageStore
from proxy.v2 import edge
from proxy.v2 import handlers as v2
from proxy.v2.direct import DirectTasks
from proxy.v2.last_known import LastKnown
from proxy.v2.poll_cache import PollCache
from proxy.v2.sides import AppSides
from proxy.v2.translation import Translator
from proxy.v3.breaker import CircuitBreaker
from proxy.v3.client import V3Client
from proxy.v3.models import TaskResult
from proxy.v3.passthrough import passthrough

if TYPE_CHECKING:  # the emulators themselves are imported only under --emulate-v3 / --emulate-v2
    from proxy.emulator import EmulatorSettings, LegacySettings

CleanupCtx = Callable[[web.Application], AsyncIterator[None]]
MiB = 1024 * 1024
CLIENTS_GAUGE_EVERY = 60.0  # seconds between counts of the clients by readiness (a metric)
log = structlog.get_logger("proxy")


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v2/upscale", v2.upscale, name="upscale")
    app.router.add_get("/v2/progress", v2.progress, name="progress")
    app.router.add_get(r"/v2/images/{task_id}.png", v2.image, name="images")
    app.router.add_route("*", "/v3/{tail:.*}", passthrough, name="v3")
    app.router.add_post("/_proxy/translate", ops.translate)
    app.router.add_get("/_proxy/guide", ops.guide)
    app.router.add_get("/_proxy/openapi.json", ops.openapi)
    app.router.add_get("/healthz", ops.healthz)
    app.router.add_get("/readyz", ops.readyz)
    app.router.add_get("/metrics", ops.metrics)
    # the migration dashboard, its data and the labels API, behind the admin token (proxy/dashboard)
    app.router.add_get("/_proxy/login", pages.login_form)
    app.router.add_post("/_proxy/login", pages.login)
    app.router.add_post("/_proxy/logout", pages.logout)
    app.router.add_get("/_proxy/dashboard", pages.overview)
    app.router.add_get("/_proxy/dashboard/clients", pages.clients)
    app.router.add_get("/_proxy/dashboard/clients/{fingerprint}", pages.client)
    app.router.add_post("/_proxy/dashboard/clients/{fingerprint}/label", pages.set_label)
    app.router.add_post("/_proxy/dashboard/clients/{fingerprint}/stage", pages.set_stage)
    app.router.add_get("/_proxy/dashboard/shadow/{id}/{image}.png", usage_api.shadow_image)
    app.router.add_get("/_proxy/dashboard/features", pages.features)
    app.router.add_get("/_proxy/dashboard/static/{name}", pages.static)
    app.router.add_get("/_proxy/usage", usage_api.usage)
    app.router.add_get("/_proxy/usage/clients/{fingerprint}", usage_api.usage_client)
    app.router.add_put("/_proxy/clients/{fingerprint}/label", usage_api.put_label)
    # the migration's admin API: answers 404 without a legacy V2 (no router), so the routes never change
    app.router.add_get("/_proxy/migration", usage_api.migration)
    app.router.add_delete("/_proxy/migration/v2-gone", usage_api.delete_v2_gone)
    app.router.add_put("/_proxy/clients/{fingerprint}/stage", usage_api.put_stage)
    if WEBHOOKS in app:
        app.router.add_post(webhooks.ROUTE, webhooks.handler(app[WEBHOOKS], partial(_webhook_result, app)))


async def _webhook_result(app: web.Application, owner: webhooks.Owner, result: TaskResult) -> None:
    if owner.composed_task:
        await app[TASKS].deliver(owner.composed_task, result)
    else:
        await app[DIRECT].deliver(owner.fingerprint, result)


def periodic(what: str, every: float, step: Callable[[web.Application], Awaitable[None]], *,
             last_run: bool = False) -> CleanupCtx:
    """A cleanup_ctx running `step(app)` every `every` seconds while the app runs; at cleanup the
    loop is cancelled and awaited, then (`last_run`) `step` runs once more. A failing step is
    logged and the loop goes on."""

    async def loop(app: web.Application) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await step(app)
            except Exception:
                log.exception("periodic job failed", job=what)

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        job = asyncio.create_task(loop(app), name=what)
        yield
        job.cancel()
        await asyncio.wait([job])
        if last_run:
            await step(app)

    return ctx


async def _flush_logs(_app: web.Application) -> None:
    logs.flush()  # lines are written unflushed: a syscall per request is measurable (proxy/logs.py)


async def _flush_metrics(app: web.Application) -> None:
    app[METRICS].flush()  # the hot path counts in plain integers (proxy/metrics.py)


async def _sweep(app: web.Application) -> None:
    if removed := await app[TASKS].sweep(time.time()):
        log.info("swept expired tasks", count=removed)


def embedded_emulator(settings: EmulatorSettings | None) -> CleanupCtx:
    """`serve --emulate-v3`: the V3 emulator on its own port in this process, used as the upstream."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        from proxy.emulator import (  # only when asked for
            EmulatorSettings,
            create_emulator_app,
        )

        s = settings or EmulatorSettings()
        runner = web.AppRunner(create_emulator_app(s), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, s.host, s.port).start()
        port = runner.addresses[0][1]
        app[UPSTREAM_URL] = str(yarl.URL.build(scheme="http", host=s.host, port=port))
        log.info("emulator listening", url=app[UPSTREAM_URL])
        yield
        await runner.cleanup()

    return ctx


def embedded_legacy_v2(settings: LegacySettings | None) -> CleanupCtx:
    """`serve --emulate-v2`: the legacy V2 emulator on its own port in this process, used as the
    V2 upstream. Started before anything reads `v2_upstream`."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        from proxy.emulator import (  # only when asked for
            LegacySettings,
            create_legacy_app,
        )

        s = settings or LegacySettings()
        runner = web.AppRunner(create_legacy_app(s), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, s.host, s.port).start()
        url = str(yarl.URL.build(scheme="http", host=s.host, port=runner.addresses[0][1]))
        app[SETTINGS].v2_upstream = url  # its port is known only now (0: any free port)
        log.info("legacy V2 emulator listening", url=url)
        yield
        await runner.cleanup()

    return ctx


async def fingerprint_secret(app: web.Application) -> AsyncIterator[None]:
    """The HMAC secret of key fingerprints: configured, or made once and kept in the data directory."""
    s = app[SETTINGS]
    s.data_dir.mkdir(parents=True, exist_ok=True)
    app[SECRET] = load_secret(s.fingerprint_secret and s.fingerprint_secret.get_secret_value(), s.data_dir)
    yield


async def upstream_client(app: web.Application) -> AsyncIterator[None]:
    """One pooled ClientSession for the app's lifetime, with explicit timeouts, and the V3 client on it."""
    s = app[SETTINGS]
    timeout = aiohttp.ClientTimeout(total=s.upstream_timeout, connect=s.upstream_connect_timeout)
    connector = aiohttp.TCPConnector(limit=s.upstream_max_connections)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, headers={"User-Agent": f"upscale-v2-proxy/{__version__}"},
    ) as session:
        app[SESSION] = session
        breaker = CircuitBreaker(s.breaker_failures, s.breaker_cooldown, s.breaker_window)
        app[METRICS].v3_breaker.set_function(lambda: breaker.state)
        app[V3] = V3Client(session, app[UPSTREAM_URL], retries=s.upstream_retries,
                           backoff=s.upstream_retry_backoff, observe=app[METRICS].observe_upstream,
                           breaker=breaker, poll_timeout=aiohttp.ClientTimeout(
                               total=min(s.upstream_poll_timeout, s.upstream_timeout),
                               connect=s.upstream_connect_timeout))
        cache = PollCache(app[MAPPINGS].task_status, fresh_for=s.poll_cache_seconds,
                          max_entries=s.poll_cache_max_entries, shared=app.get(SHARED_RESULTS))
        app[DIRECT] = DirectTasks(app[V3], cache, app.get(WEBHOOKS), s.webhook_fallback)
        yield


async def stores(app: web.Application) -> AsyncIterator[None]:
    """Composed tasks' state and bytes: in Redis when configured (replicas), else SQLite and files
    under the data directory."""
    s = app[SETTINGS]
    if s.redis_url is None:
        s.data_dir.mkdir(parents=True, exist_ok=True)
        app[TASK_STORE] = SqliteTaskStore(s.data_dir / "tasks.sqlite3")
        app[RESULTS] = FileResultStore(s.data_dir / "results")
        app[USAGE] = Usage(SqliteUsageStore(s.data_dir / "usage.sqlite3"), s)
        if s.v2_upstream:
            app[MIGRATION_STORE] = SqliteMigrationStore(s.data_dir / "migration.sqlite3")
        yield
        await app[TASK_STORE].close()
        await app[USAGE].store.close()
        if s.v2_upstream:
            await app[MIGRATION_STORE].close()
        return
    from proxy.stores import redis  # only when configured

    async with redis.connect(s.redis_url.get_secret_value(), s.redis_timeout) as client:
        app[TASK_STORE] = redis.RedisTaskStore(client, s.redis_prefix)
        app[RESULTS] = redis.RedisResultStore(client, s.redis_prefix)
        app[SHARED_RESULTS] = redis.RedisSharedResults(client, s.redis_prefix)
        app[USAGE] = Usage(RedisUsageStore(client, s.redis_prefix), s)
        if s.v2_upstream:
            app[MIGRATION_STORE] = RedisMigrationStore(client, s.redis_prefix)
        try:
            await client.ping()
        except redis.exceptions.AuthenticationError:
            raise
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            log.warning("Redis is unreachable for now: composed tasks get code 5 until it is back", error=str(e))
        yield


async def _flush_usage(app: web.Application) -> None:
    await app[USAGE].flush()  # the hot path counts in memory (proxy/usage/tally.py)


async def _prune_usage(app: web.Application) -> None:
    if removed := await app[USAGE].prune():
        log.info("pruned usage hours past their retention", count=removed)


async def migration(app: web.Application) -> AsyncIterator[None]:
    """With a legacy V2 (UPSCALE_PROXY_V2_UPSTREAM): the V2 side, on the pooled session, and the
    router (its changes re-read every second, by the periodic job create_app adds) (proxy/migration)."""
    s = app[SETTINGS]
    app[LEGACY] = LegacyV2(app[SESSION], s.v2_upstream, gone_after=s.v2_gone_after)
    router = app[ROUTER] = Router(Rules.load(s.migration_file), app[MIGRATION_STORE],
                                  allow_route=s.allow_route_header, route_ttl=s.route_ttl)
    await _refresh_router(app)
    health = Health(HealthSettings(s.rollback_window, s.rollback_min_calls, s.rollback_max_failure_rate,
                                   s.rollback_max_mismatch_rate, s.promote_after))
    migrating = app[MIGRATION] = Migration(router, app[MIGRATION_STORE], health, app[RESULTS], app[USAGE].tallies,
                                           hold=s.rollback_hold, promote_percent=s.promote_percent)
    sides = AppSides(app, _image_fetcher(app, app[UPSTREAM_URL]), _image_fetcher(app, s.v2_upstream))
    migrating.shadows = Shadows(sides, ShadowSettings(
        s.shadow_max_per_minute, s.shadow_fraction, s.shadow_noise_every, deadline=s.compose_deadline,
        thresholds=Thresholds(s.shadow_min_psnr, s.shadow_min_ssim)), migrating.on_shadow)
    log.info("gradual migration on: V2 side by side", v2_upstream=s.v2_upstream, default=router.rules.default.stage,
             v2_gone=router.gone)
    yield
    await migrating.close()


def _image_fetcher(app: web.Application, upstream: str) -> ImageFetcher:
    """Fetches images from `upstream`'s origin and the configured image origins and hosts only."""
    s = app[SETTINGS]
    origins = AllowedOrigins.configure(upstream, s.image_origins, s.image_hosts, s.image_private_addresses)
    return ImageFetcher(app[SESSION], origins, s.image_max_mb * MiB, s.image_fetch_timeout,
                        observe=app[METRICS].observe_upstream)


async def _refresh_router(app: web.Application) -> None:
    labels = {**app[SETTINGS].client_labels, **await app[USAGE].store.labels()}
    await app[ROUTER].refresh(labels)


async def executor(app: web.Application) -> AsyncIterator[None]:
    """A bounded thread pool for the image steps, off the event loop."""
    with ThreadPoolExecutor(app[SETTINGS].compose_workers, thread_name_prefix="compose") as pool:
        app[EXECUTOR] = pool
        yield


async def task_engine(app: web.Application) -> AsyncIterator[None]:
    """The composed path: the engine, on the V3 client, the stores and the thread pool, and its
    worker, which moves composed tasks on in the background until the app stops."""
    s = app[SETTINGS]
    fetcher = _image_fetcher(app, app[UPSTREAM_URL])
    if not s.emulate_v3 and not (s.image_origins or s.image_hosts):
        log.warning("composed tasks can fetch V3 images from the upstream's origin only; "
                    "set UPSCALE_PROXY_IMAGE_ORIGINS to the origin of V3's image URLs", allowed=str(fetcher.allowed))
    engine = app[TASKS] = TaskEngine(
        app[V3], app[TASK_STORE], app[RESULTS], fetcher, app[EXECUTOR],
        EngineSettings(deadline=s.compose_deadline, lease=s.task_lease, max_pending=s.compose_max_pending,
                       webhook_fallback=s.webhook_fallback, png_compress_level=s.png_compress_level,
                       max_tasks=s.compose_max_tasks, store_wait=s.redis_timeout, outage_grace=s.poll_outage_grace,
                       breaker_cooldown=s.breaker_cooldown),
        app[MAPPINGS].task_status, webhooks=app.get(WEBHOOKS),
        faces=A1111FaceRestorer(app[SESSION], s.face_restorer_url, s.face_restorer_timeout)
        if s.face_restorer_url else NO_FACES,
        on_state=lambda state: app[METRICS].composed_tasks.labels(state).inc(),
        shared=app.get(SHARED_RESULTS), on_evicted=app[METRICS].count_webhook_result_evicted,
    )
    worker = asyncio.create_task(engine.run(), name="task engine")
    yield
    worker.cancel()
    await asyncio.wait([worker])


def create_app(settings: Settings | None = None, emulator: EmulatorSettings | None = None,
               legacy: LegacySettings | None = None) -> web.Application:
    """The proxy. With `settings.emulate_v3`, the emulator (`emulator` settings) is its upstream;
    with `settings.emulate_v2`, the legacy V2 emulator (`legacy` settings) is its V2 upstream."""
    settings = settings or Settings()
    app = web.Application(middlewares=[edge.v2_edge], client_max_size=settings.max_body_mb * MiB)
    app[SETTINGS] = settings
    app[MAPPINGS] = mappings.load()
    app[TRANSLATOR] = Translator.from_settings(app[MAPPINGS], settings)
    app[METRICS] = Metrics(settings.metrics_max_clients)
    app[LIMITS] = Limits(settings.max_inflight_mb * MiB, settings.max_upstream_calls, settings.request_timeout,
                         on_refusal=lambda limit: app[METRICS].limits_refused.labels(limit).inc())
    app[DEPRECATION] = Deprecation(settings)
    app[BROWNOUTS] = Brownouts(settings.brownouts, settings.sunset_date, settings.deprecation_link)
    app[READINESS] = Readiness()
    app[LAST_KNOWN] = LastKnown(settings.poll_outage_grace)
    app[UPSTREAM_URL] = settings.upstream
    dashboard.setup(app, settings)
    # the usage store's flushes, read at each scrape (the store itself is made by `stores`)
    app[METRICS].usage_flush_lag.set_function(lambda: app[USAGE].lag() if USAGE in app else 0.0)
    app[METRICS].usage_flush_errors.set_function(lambda: app[USAGE].flush_errors if USAGE in app else 0)
    if settings.webhooks:
        # tokens any process accepts where deliveries are shared (Redis), else this process's own
        app[WEBHOOKS] = webhooks.WebhookTokens(str(settings.public_url), ttl=settings.compose_deadline,
                                               secret=(lambda: app[SECRET]) if settings.redis_url else None)
    # started in this order, cleaned up in reverse: the log flusher is the last to stop
    app.cleanup_ctx.append(periodic("log flush", logs.FLUSH_EVERY, _flush_logs, last_run=True))
    app.cleanup_ctx.append(periodic("metrics flush", metrics.FLUSH_EVERY, _flush_metrics, last_run=True))
    app.cleanup_ctx.append(fingerprint_secret)
    if settings.emulate_v3:
        app.cleanup_ctx.append(embedded_emulator(emulator))
    if settings.emulate_v2:
        app.cleanup_ctx.append(embedded_legacy_v2(legacy))
    app.cleanup_ctx.append(stores)  # before the upstream client: the poll cache gets Redis's shared tier
    app.cleanup_ctx.append(periodic("usage flush", USAGE_FLUSH_EVERY, _flush_usage, last_run=True))
    app.cleanup_ctx.append(periodic("usage prune", 3600, _prune_usage))
    app.cleanup_ctx.append(periodic("clients by readiness", CLIENTS_GAUGE_EVERY, usage_api.count_clients))
    app.cleanup_ctx.append(upstream_client)
    if settings.v2_upstream or settings.emulate_v2:  # the embedded V2 sets v2_upstream as it starts
        app.cleanup_ctx.append(migration)
        app.cleanup_ctx.append(periodic("migration refresh", 1.0, _refresh_router))
    app.cleanup_ctx.append(executor)
    app.cleanup_ctx.append(task_engine)
    app.cleanup_ctx.append(periodic("sweep", settings.sweep_interval, _sweep))
    if settings.memory_trim_interval:
        keep_freed_memory()  # while a load lasts; the periodic trim gives it back when idle
        app.cleanup_ctx.append(periodic("memory trim", settings.memory_trim_interval, trim_memory))
    app.on_startup.append(_ready)  # after every cleanup_ctx has started
    app.on_shutdown.append(_draining)
    app.on_response_prepare.append(_close_while_draining)
    setup_routes(app)
    return app


async def _ready(app: web.Application) -> None:
    app[FINGERPRINT] = Fingerprinter(app[SECRET])
    app[edge.EDGE] = edge.EdgeParts(app[FINGERPRINT], app[METRICS], app[DEPRECATION],
                                    app[BROWNOUTS], app[LIMITS], app[MAPPINGS].errors, app[USAGE].tallies,
                                    app[MIGRATION].after_call if MIGRATION in app else None)
    app[READINESS].state = "ready"


async def _draining(app: web.Application) -> None:
    start_draining(app)


def start_draining(app: web.Application) -> None:
    """SIGTERM: /readyz answers 503 from now on, so that load balancers move away, while every
    request is still served until the listener closes (proxy/cli.py)."""
    app[READINESS].state = "draining"


async def _close_while_draining(request: web.Request, response: web.StreamResponse) -> None:
    """While draining, each response closes its connection (`Connection: close`): a keep-alive
    client reconnects through its load balancer, to a replica that stays, before this one stops
    listening and drops the idle connections left."""
    if request.app[READINESS].state == "draining":
        response.force_close()
        response.headers["Connection"] = "close"  # aiohttp writes it only when told before this hook
