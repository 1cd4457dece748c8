"""Typed keys for what the app and each request carry."""

from aiohttp import web

from proxy.mappings import Mappings
from proxy.settings import Settings
from proxy.v3.client import V3Client

SETTINGS = web.AppKey("settings", Settings)
MAPPINGS = web.AppKey("mappings", Mappings)
UPSTREAM_URL = web.AppKey("upstream_url", str)
V3 = web.AppKey("v3", V3Client)

# fields a handler adds to its request's log line (upstream status, task id, warn)
LOG_FIELDS = web.RequestKey("log_fields", dict)
