"""Typed keys for what the app and each request carry."""

from aiohttp import ClientSession, web

from proxy.compose.tasks import Composer
from proxy.mappings import Mappings
from proxy.settings import Settings
from proxy.translate.plan import Policies
from proxy.v3.client import V3Client

SETTINGS = web.AppKey("settings", Settings)
MAPPINGS = web.AppKey("mappings", Mappings)
POLICIES = web.AppKey("policies", Policies)
UPSTREAM_URL = web.AppKey("upstream_url", str)
SESSION = web.AppKey("session", ClientSession)
V3 = web.AppKey("v3", V3Client)
COMPOSER = web.AppKey("composer", Composer)
SECRET = web.AppKey("fingerprint_secret", bytes)

# fields a handler adds to its request's log line (upstream status, task id, warn)
LOG_FIELDS = web.RequestKey("log_fields", dict)
