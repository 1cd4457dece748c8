"""Which headers a hop passes on: the /v3 pass-through and the legacy V2 side both forward calls."""

from __future__ import annotations

from multidict import CIMultiDict

# RFC 9110 section 7.6.1, plus what aiohttp sets itself for each hop
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade", "host",
})


def end_to_end(headers: CIMultiDict | dict) -> CIMultiDict:
    """The headers meant for the other end: without the hop-by-hop ones, nor those `Connection` lists."""
    listed = {h.strip().lower() for h in headers.get("Connection", "").split(",") if h.strip()}
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP | listed)
