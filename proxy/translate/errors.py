"""V3 error (HTTP status + body) -> V2 code, by the table in mappings/errors.toml."""

from __future__ import annotations

from pydantic import ValidationError

from proxy.errors import V2Error
from proxy.mappings import ErrorTable
from proxy.v3.models import ErrorBody


def from_v3_error(status: int, body: bytes, table: ErrorTable) -> V2Error:
    """Match on `reason` first, then on the status; an unparseable body maps by status alone."""
    try:
        err = ErrorBody.model_validate_json(body)
    except ValidationError:
        err = ErrorBody()
    code = table.reasons.get(err.reason)
    if code is None:
        code = table.statuses.get(status)
    if code is None:
        code = table.fallback.client_error if 400 <= status < 500 else table.fallback.server_error
    said = ": ".join(part for part in (err.reason, err.message) if part) or f"HTTP {status}"
    msg = f"upstream error: {said}"
    if status in table.notes:
        msg = f"{msg} ({table.notes[status]})"
    return V2Error(code, msg, upstream_status=status)
