"""Scrubbing the caller's key from text that came from elsewhere.

Whatever came from upstream (V3's error messages, a task's failure reason, a pass-through error
body) or from a library's log goes through `redact` before it is logged or returned: the one
place where a key is scrubbed. It knows nothing of V2 or V3, so either side may use it.
"""

from __future__ import annotations

import re
from urllib.parse import quote

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
