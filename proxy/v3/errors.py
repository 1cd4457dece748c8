"""Every error the V3 client raises, and nothing else (it knows nothing of V2 codes):

    V3Error                  base: something went wrong calling V3
    ├── V3StatusError        V3 answered with a non-200 status (status, reason, message)
    ├── V3Unreachable        no connection could be opened, or it broke before the reply was read
    ├── V3Timeout            V3 did not answer in time
    └── V3BadReply           a 200 whose body cannot be read

`str(error)` is safe to show a client: no upstream address, no aiohttp wording; the lower-level
exception, for the log, is the `__cause__`. A V3StatusError's message is V3's own words, which may
echo the caller's key: the V2 edge redacts it.
"""

from __future__ import annotations

import orjson


class V3Error(Exception):
    """Base of the V3 client's errors; `status` is V3's HTTP status when there was one.

    `transient`: the error says V3 can't answer now (unreachable, too slow, rate limited, a 5xx,
    an unreadable reply from something in between), not that it refused this call: the same call
    may well succeed later. Polls ride through these, and the task engine waits them out."""

    status: int | None = None

    @property
    def transient(self) -> bool:
        return True


class V3StatusError(V3Error):
    """A non-200 reply; `reason` and `message` are "" when its body is not V3's error shape."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"V3 answered HTTP {status}" + "".join(f": {p}" for p in (reason, message) if p))
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def transient(self) -> bool:
        return self.status == 429 or self.status >= 500

    @classmethod
    def from_reply(cls, status: int, body: bytes) -> V3StatusError:
        """Liberal in what it reads: `{"code","reason","message","metadata"}`, or any part of it,
        or anything at all (a gateway's HTML page, an empty body)."""
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict):
            doc = {}
        reason, message = doc.get("reason"), doc.get("message")
        return cls(status, reason if isinstance(reason, str) else "", message if isinstance(message, str) else "")


class V3Unreachable(V3Error):
    """No connection to V3, or it broke. `sent` is False when the request cannot have reached V3
    (no connection was opened): only then is it safe to send a POST again."""

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


class V3Timeout(V3Error):
    """V3 did not answer within the client's timeout."""


class V3BadReply(V3Error):
    """V3 answered 200 with a body the client cannot read."""

    status = 200
