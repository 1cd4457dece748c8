"""The caller's API key, from any of the three header forms legacy clients use.

The edge reads it once per request (`find_key`, into `request[CALLER]`); handlers take it from
there with `api_key`. The key is only ever forwarded upstream (as `Authorization: Bearer KEY`):
never logged or stored.
"""

from __future__ import annotations

import re

from aiohttp import web

from proxy.errors import V2Code, V2Error
from proxy.keys import CALLER

# what a key can be: printable ASCII, no spaces. aiohttp hands header bytes that are not UTF-8 on
# as lone surrogates, which can be neither fingerprinted nor sent upstream
_KEY = re.compile(r"[\x21-\x7e]+")


def find_key(request: web.Request) -> str | None:
    """`Authorization: Bearer KEY`, a bare key in `Authorization`, or `X-Omni-Key: KEY`; else None
    (no key, or one that can't be a key)."""
    key = _sent(request)
    return key if _KEY.fullmatch(key) else None


def _sent(request: web.Request) -> str:
    header = request.headers.get("Authorization", "").strip()
    scheme, _, rest = header.partition(" ")
    key = rest.strip() if scheme.lower() == "bearer" else header
    return key or request.headers.get("X-Omni-Key", "").strip()


def api_key(request: web.Request) -> str:
    """The key the edge found, or a V2Error with code 4."""
    key = request[CALLER].key
    if key is None:
        if _sent(request):
            raise V2Error(V2Code.INVALID_AUTH, "invalid API key: a key is printable ASCII, with no spaces")
        raise V2Error(V2Code.INVALID_AUTH, "missing API key: send Authorization: Bearer <key>")
    return key
