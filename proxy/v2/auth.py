"""The caller's API key, from any of the three header forms legacy clients use."""

from __future__ import annotations

from aiohttp import web

from proxy.errors import V2Code, V2Error


def find_key(request: web.Request) -> str | None:
    """`Authorization: Bearer KEY`, a bare key in `Authorization`, or `X-Omni-Key: KEY`; else None.

    The key is only ever forwarded upstream (as `Authorization: Bearer KEY`): never logged or stored.
    """
    header = request.headers.get("Authorization", "").strip()
    scheme, _, rest = header.partition(" ")
    key = rest.strip() if scheme.lower() == "bearer" else header
    key = key or request.headers.get("X-Omni-Key", "").strip()
    if not key or any(c.isspace() for c in key):
        return None
    return key


def api_key(request: web.Request) -> str:
    """The key, or a V2Error with code 4."""
    key = find_key(request)
    if key is None:
        raise V2Error(V2Code.INVALID_AUTH, "missing API key: send Authorization: Bearer <key>")
    return key
