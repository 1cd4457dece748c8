"""Typed keys for what the app and each request carry (aiohttp AppKey and RequestKey)."""

from aiohttp import ClientSession, web

from proxy.compose.tasks import Composer
from proxy.deprecation import Brownouts, Deprecation
from proxy.mappings import Mappings
from proxy.metrics import Metrics
from proxy.settings import Settings
from proxy.translate.plan import Policies
from proxy.v3.client import V3Client


class Readiness:
    """starting -> ready -> draining, for /readyz."""

    state = "starting"


SETTINGS = web.AppKey("settings", Settings)
MAPPINGS = web.AppKey("mappings", Mappings)
POLICIES = web.AppKey("policies", Policies)
UPSTREAM_URL = web.AppKey("upstream_url", str)
SESSION = web.AppKey("session", ClientSession)
V3 = web.AppKey("v3", V3Client)
COMPOSER = web.AppKey("composer", Composer)
SECRET = web.AppKey("fingerprint_secret", bytes)
DEPRECATION = web.AppKey("deprecation", Deprecation)
BROWNOUTS = web.AppKey("brownouts", Brownouts)
METRICS = web.AppKey("metrics", Metrics)
READINESS = web.AppKey("readiness", Readiness)

# per request: what the handler adds to the request's audit event, and the caller's fingerprint
LOG_FIELDS = web.RequestKey("log_fields", dict)
FINGERPRINT = web.RequestKey("fingerprint", str)
