"""The caller's API key, from any of the three header forms legacy clients use."""

from aiohttp import web

from proxy.errors import V2Code, V2Error


def api_key(request: web.Request) -> str:
    """`Authorization: Bearer KEY`, a bare key in `Authorization`, or `X-Omni-Key: KEY`.

    The key is only ever forwarded upstream (as `Authorization: Bearer KEY`): never logged or stored.
    """
    header = request.headers.get("Authorization", "").strip()
    scheme, _, rest = header.partition(" ")
    key = rest.strip() if scheme.lower() == "bearer" else header
    key = key or request.headers.get("X-Omni-Key", "").strip()
    if not key or any(c.isspace() for c in key):
        raise V2Error(V2Code.INVALID_AUTH, "missing API key: send Authorization: Bearer <key>")
    return key
