"""The caller's API key, from any of the three header forms legacy clients use.

The edge reads it once per request (`find_key`, into `request[CALLER]`); handlers take it from
there with `api_key`. The key is only ever forwarded upstream (as `Authorization: Bearer KEY`):
never logged or stored.
"""

from __future__ import annotations

from aiohttp import web

from proxy.errors import V2Code, V2Error
from proxy.keys import CALLER


def find_key(request: web.Request) -> str | None:
    """`Authorization: Bearer KEY`, a bare key in `Authorization`, or `X-Omni-Key: KEY`; else None."""
    header = request.headers.get("Authorization", "").strip()
    scheme, _, rest = header.partition(" ")
    key = rest.strip() if scheme.lower() == "bearer" else header
    key = key or request.headers.get("X-Omni-Key", "").strip()
    if not key or any(c.isspace() for c in key):
        return None
    return key


def api_key(request: web.Request) -> str:
    """The key the edge found, or a V2Error with code 4."""
    key = request[CALLER].key
    if key is None:
        raise V2Error(V2Code.INVALID_AUTH, "missing API key: send Authorization: Bearer <key>")
    return key
