"""V3 error -> V2 error, applied once, at the V2 edge (spec section 6).

A V3StatusError maps by the table in mappings/errors.toml: its `reason` first, then its HTTP
status, then the fallback for the status class. The client-level errors map to fixed codes:
unreachable 5, timeout 9, an unreadable 200 -1.

The key the caller sent is scrubbed from what V3 said (`proxy.redact`).
"""

from __future__ import annotations

from proxy.errors import V2Code, V2Error
from proxy.mappings import ErrorTable
from proxy.redact import redact
from proxy.v3.errors import V3Error, V3StatusError, V3Timeout, V3Unreachable


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
