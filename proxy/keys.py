"""Typed keys for what the app and each request carry (aiohttp AppKey and RequestKey)."""

from concurrent.futures import Executor
from dataclasses import dataclass

from aiohttp import ClientSession, web

from proxy.compose.engine import TaskEngine
from proxy.deprecation import Brownouts, Deprecation
from proxy.fingerprint import Fingerprinter
from proxy.mappings import Mappings
from proxy.metrics import Metrics
from proxy.migration.legacy import LegacyV2
from proxy.migration.router import Router
from proxy.migration.service import Migration
from proxy.migration.store import MigrationStore
from proxy.settings import Settings
from proxy.stores import ResultStore, TaskStore
from proxy.usage.service import Usage
from proxy.v2.audit_record import AuditRecord
from proxy.v2.direct import DirectTasks
from proxy.v2.last_known import LastKnown
from proxy.v2.translation import Translator
from proxy.v3.client import V3Client
from proxy.webhooks import WebhookTokens


class Readiness:
    """starting -> ready -> draining, for /readyz."""

    state = "starting"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a V2 call, read once by the edge: the key (only ever forwarded upstream, never
    logged or stored) and its fingerprint (what is logged and stored instead). None: no key sent."""

    key: str | None
    fingerprint: str | None


SETTINGS = web.AppKey("settings", Settings)
MAPPINGS = web.AppKey("mappings", Mappings)
TRANSLATOR = web.AppKey("translator", Translator)
UPSTREAM_URL = web.AppKey("upstream_url", str)
SESSION = web.AppKey("session", ClientSession)
V3 = web.AppKey("v3", V3Client)
SECRET = web.AppKey("fingerprint_secret", bytes)
FINGERPRINT = web.AppKey("fingerprinter", Fingerprinter)  # key -> fingerprint, with SECRET, once ready
TASK_STORE = web.AppKey("task_store", TaskStore)
RESULTS = web.AppKey("results", ResultStore)
EXECUTOR = web.AppKey("executor", Executor)
TASKS = web.AppKey("tasks", TaskEngine)
DIRECT = web.AppKey("direct", DirectTasks)
LAST_KNOWN = web.AppKey("last_known", LastKnown)  # what polls answer while V3 or the store can't
WEBHOOKS = web.AppKey("webhooks", WebhookTokens)
DEPRECATION = web.AppKey("deprecation", Deprecation)
BROWNOUTS = web.AppKey("brownouts", Brownouts)
METRICS = web.AppKey("metrics", Metrics)
USAGE = web.AppKey("usage", Usage)  # the usage store, its tallies and its views (proxy/usage)
READINESS = web.AppKey("readiness", Readiness)
# with Redis only: results every replica reads (proxy.stores.redis.RedisSharedResults, typed loosely
# here so that redis is imported only when configured), for the poll cache and the task engine
SHARED_RESULTS = web.AppKey("shared_results", object)
# with a legacy V2 only (UPSCALE_PROXY_V2_UPSTREAM): the migration's store, its router, the V2 side
MIGRATION_STORE = web.AppKey("migration_store", MigrationStore)
ROUTER = web.AppKey("router", Router)
MIGRATION = web.AppKey("migration", Migration)  # what follows calls and shadow comparisons
LEGACY = web.AppKey("legacy", LegacyV2)

# per V2 request, set by the edge: the caller, and the audit record handlers add to
CALLER = web.RequestKey("caller", Caller)
AUDIT = web.RequestKey("audit", AuditRecord)
