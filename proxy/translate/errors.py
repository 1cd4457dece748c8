"""V3 error -> V2 error, applied once, at the V2 edge (spec section 6).

A V3StatusError maps by the table in mappings/errors.toml: its `reason` first, then its HTTP
status, then the fallback for the status class. The client-level errors map to fixed codes:
unreachable 5, timeout 9, an unreadable 200 -1.

Whatever came from upstream (V3's error messages, a task's failure reason, a webhook's fields, a
pass-through error body) goes through `redact` before it is logged or returned: it is the one
place where the caller's key is scrubbed.
"""

from __future__ import annotations

import re
from urllib.parse import quote

from proxy.errors import V2Code, V2Error
from proxy.mappings import ErrorTable
from proxy.v3.errors import V3Error, V3StatusError, V3Timeout, V3Unreachable

REDACTED = "[redacted]"
# any bearer token (RFC 6750's b64token), whoever's: `Bearer KEY`, `Authorization: Bearer KEY`, `bearer%20KEY`
_BEARER = re.compile(r"(?i)(bearer(?:\s|%20|\+)+)[A-Za-z0-9\-._~+/]+=*")


def redact(text: str, key: str | None = None) -> str:
    """`text` without the caller's key (as sent, URL- or JSON-escaped, in any case) and without any
    `Bearer <token>`: what upstream says may echo what it was sent. Without a key, only the
    bearer tokens go."""
    if not text:
        return text
    if key:
        forms = sorted({key, quote(key, safe=""), key.replace("/", "\\/")}, key=len, reverse=True)
        text = re.sub("|".join(map(re.escape, forms)), REDACTED, text, flags=re.IGNORECASE)
    return _BEARER.sub(r"\g<1>" + REDACTED, text)


def to_v2_error(err: V3Error, table: ErrorTable, key: str | None = None) -> V2Error:
    """The V2Error a client is told about; `key` (the one sent upstream) is redacted from it."""
    match err:
        case V3StatusError(status=status, reason=reason, message=message):
            code = table.reasons.get(reason)
            if code is None:
                code = table.statuses.get(status)
            if code is None:
                code = table.fallback.client_error if 400 <= status < 500 else table.fallback.server_error
            said = ": ".join(part for part in (reason, message) if part) or f"HTTP {status}"
            msg = f"upstream error: {said}"
            if status in table.notes:
                msg = f"{msg} ({table.notes[status]})"
        case V3Unreachable():
            code, msg = V2Code.HOST_UNAVAILABLE, f"upstream unreachable: {err}"
        case V3Timeout():
            code, msg = V2Code.TIMEOUT, "upstream did not answer in time"
        case _:  # V3BadReply, and any V3Error added later
            code, msg = V2Code.INTERNAL_ERROR, "upstream sent a reply the proxy cannot read"
    return V2Error(code, redact(msg, key), upstream_status=err.status)


def from_v3_error(status: int, body: bytes, table: ErrorTable) -> V2Error:
    """A V3 error reply as it came over the wire (status, body) -> its V2Error (samples, tools)."""
    return to_v2_error(V3StatusError.from_reply(status, body), table)
