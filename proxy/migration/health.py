"""When a client steps back, or forward, on its own (pure; each process judges the calls it sees).

Rollback: a client in `canary` or `translated` whose calls served by the translation fail, or
whose shadow comparisons mismatch, above a rate over its last `window` of them (at least
`min_calls` seen) steps back one stage, with the figures that made it in the verdict.

A translated call counts once per task: a submission the translation failed, with V2 code -1, 2,
5, 9 or 10 (internal, a model it did not know, unavailable, a timeout, a feature refused), or the
task's final status, a failure when 3 or 4. Codes 1, 3, 4, 6, 7 answer the client's own request,
as V2 did, and do not count.

Promotion (optional, `promote_after` > 0): a client in `shadow` whose last `promote_after`
comparisons all matched (or were explained) steps forward to `canary`, unless a rollback holds it
back until `hold_until`.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

FAILURE_CODES = frozenset({-1, 2, 5, 9, 10})
FAILED_STATUSES = frozenset({3, 4})


@dataclass(frozen=True)
class HealthSettings:
    window: int = 20
    min_calls: int = 5
    max_failure_rate: float = 0.2
    max_mismatch_rate: float = 0.2
    promote_after: int = 0  # 0: never promoted automatically


@dataclass(frozen=True)
class Step:
    """A move the judge asks for, with its figures (for the audit and the dashboard)."""

    direction: str  # back | forward
    why: str
    figures: dict


@dataclass
class _Seen:
    calls: collections.deque[bool] = field(default_factory=collections.deque)  # True: failed
    comparisons: collections.deque[str] = field(default_factory=collections.deque)  # outcomes


class Health:
    def __init__(self, settings: HealthSettings) -> None:
        self.settings = settings
        self._seen: dict[str, _Seen] = {}

    def _client(self, fingerprint: str) -> _Seen:
        return self._seen.setdefault(fingerprint, _Seen())

    def forget(self, fingerprint: str) -> None:
        """A client changed stage: its new stage is judged on new calls only."""
        self._seen.pop(fingerprint, None)

    def call(self, fingerprint: str, stage: str, *, code: int = 0, status: int | None = None) -> Step | None:
        """A call the translation served for a client in canary or translated."""
        if stage not in ("canary", "translated"):
            return None
        calls = self._client(fingerprint).calls
        calls.append(code in FAILURE_CODES or status in FAILED_STATUSES)
        while len(calls) > self.settings.window:
            calls.popleft()
        failed, s = sum(calls), self.settings
        if len(calls) >= s.min_calls and failed / len(calls) > s.max_failure_rate:
            return Step("back", f"{failed} of its last {len(calls)} translated calls failed "
                                f"(more than {s.max_failure_rate:.0%})",
                        {"failed": failed, "calls": len(calls), "max_failure_rate": s.max_failure_rate})
        return None

    def comparison(self, fingerprint: str, stage: str, outcome: str) -> Step | None:
        """A shadow comparison's outcome (match, explained, mismatch; an error is not counted)."""
        if outcome == "error":
            return None
        seen, s = self._client(fingerprint).comparisons, self.settings
        seen.append(outcome)
        while len(seen) > max(s.window, s.promote_after):
            seen.popleft()
        recent = list(seen)[-s.window:]
        mismatched = recent.count("mismatch")
        if stage in ("canary", "translated") and len(recent) >= s.min_calls \
                and mismatched / len(recent) > s.max_mismatch_rate:
            return Step("back", f"{mismatched} of its last {len(recent)} shadow comparisons mismatched "
                                f"(more than {s.max_mismatch_rate:.0%})",
                        {"mismatched": mismatched, "compared": len(recent), "max_mismatch_rate": s.max_mismatch_rate})
        last = list(seen)[-s.promote_after:] if s.promote_after else []
        if stage == "shadow" and s.promote_after and len(last) == s.promote_after and "mismatch" not in last:
            return Step("forward", f"its last {len(last)} shadow comparisons matched",
                        {"matched": len(last), "promote_after": s.promote_after})
        return None
