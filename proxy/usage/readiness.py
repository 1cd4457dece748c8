"""Each client's readiness to leave V2, and its deadline: pure functions of what the store knows,
the feature registry and the clock (injected), so the rules are tested without a server.

Within the window (UPSCALE_PROXY_MIGRATED_AFTER_DAYS, 30 days by default, as Shopify and
Microsoft count "done"):

    migrated   no V2 call in the window, and calls on the /v3 pass-through in it
    quiet      no call of either kind in the window
    blocked    V2 calls in the window, using a feature V3 lacks (the registry's verdict "lacking")
    ready      V2 calls in the window, every feature they use has a way in V3

The deadline is the sunset date (UPSCALE_PROXY_SUNSET_DATE): for a client still on V2 it is
overdue once passed, due soon under DUE_SOON_DAYS before it, else on track; "no sunset" when none
is set; "done" for a migrated or quiet client.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from proxy.translate.features import BY_NAME

Readiness = Literal["migrated", "quiet", "ready", "blocked"]
Deadline = Literal["done", "on track", "due soon", "overdue", "no sunset"]
READINESS: tuple[Readiness, ...] = ("blocked", "ready", "migrated", "quiet")  # the order shown
DAY = 86400
DUE_SOON_DAYS = 30


@dataclass(frozen=True, slots=True)
class Verdict:
    readiness: Readiness
    deadline: Deadline
    days_left: int | None  # to the sunset; None without one
    blocking: tuple[str, ...]  # the features V3 lacks that it uses


def lacking(features: Iterable[str]) -> tuple[str, ...]:
    """The features among these that V3 has no way for, in the registry's order."""
    used = set(features)
    return tuple(name for name in BY_NAME if name in used and BY_NAME[name].verdict == "lacking")


def readiness(*, last_v2: float, last_v3: float, features: Iterable[str], now: float, window_days: int,
              sunset: datetime | None) -> Verdict:
    """A client's verdict. `last_v2`, `last_v3`: its last calls (epoch seconds, 0: never);
    `features`: those its V2 calls used within the window."""
    since = now - window_days * DAY
    days_left = None if sunset is None else int((sunset.timestamp() - now) // DAY)
    if last_v2 < since:
        return Verdict("migrated" if last_v3 >= since else "quiet", "done", days_left, ())
    blocking = lacking(features)
    return Verdict("blocked" if blocking else "ready", deadline(days_left), days_left, blocking)


def deadline(days_left: int | None) -> Deadline:
    if days_left is None:
        return "no sunset"
    if days_left < 0:
        return "overdue"
    return "due soon" if days_left < DUE_SOON_DAYS else "on track"
