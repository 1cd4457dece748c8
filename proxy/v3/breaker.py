"""A circuit breaker for one upstream: when V3 is down, stop calling it for a while.

    closed ── `failures` "down" failures in a row, within `window` s ──▶ open
    open ── `cooldown` s later ──▶ half-open: one probe call goes through, the others fail fast
    half-open ── the probe is answered ──▶ closed
    half-open ── the probe fails ──▶ open, for another cool-down

A "down" failure says nothing answers for V3: no connection, a connection that broke, a timeout, a
502/503/504. Any other reply is a sign of life, a refusal included (4xx, a 429, a 500 about one
task): it resets the count, and closes a half-open breaker. While open, a call raises V3Unreachable
at once (`sent=False`: nothing went out); the V2 edge answers it with code 5, and the task engine
waits it out with back-off, as it does any outage.

The V3 client asks `admit()` before each attempt and reports how the attempt ended. Results of
calls let through before the breaker last opened are not counted: the probe alone decides.

Polls are not gated (DESIGN.md, "Polls are the most forgiving hop"): a task-result call is a cheap,
idempotent GET that may always try, and a legacy SDK's wait loop dies on the first poll that is
not code 0. Such calls report through `observe()`: while closed, their "down" failures count like
any other; while open, an answer from V3 is the best probe there is, and closes the breaker at once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

import structlog

from proxy.v3.errors import V3Unreachable

DOWN_STATUSES = frozenset({502, 503, 504})  # a gateway with nothing behind it, or V3 saying it's down
log = structlog.get_logger("proxy")


class BreakerState(IntEnum):
    """The breaker's state; the value is what the metrics gauge shows."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(frozen=True, slots=True)
class Ticket:
    """One attempt let through: whether it is the half-open probe, and in which closed period
    (`period` counts the openings) it started."""

    probe: bool
    period: int


class CircuitBreaker:
    def __init__(self, failures: int = 5, cooldown: float = 10.0, window: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`failures` 0: never opens."""
        self._failures, self._cooldown, self._window, self._clock = failures, cooldown, window, clock
        self._streak = 0  # "down" failures in a row, the first at `_streak_started`
        self._streak_started = 0.0
        self._opened_at: float | None = None  # None: closed
        self._probing = False
        self._period = 0

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._probing or self._clock() >= self._opened_at + self._cooldown:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def admit(self) -> Ticket:
        """Let an attempt through, or raise V3Unreachable while open (and while the probe is out)."""
        if self._opened_at is None:
            return Ticket(probe=False, period=self._period)
        now = self._clock()
        if self._probing or now < self._opened_at + self._cooldown:
            retry = max(1, math.ceil(self._opened_at + self._cooldown - now))
            raise V3Unreachable(f"V3 is unavailable, retry in {retry} s (calls to it are paused after "
                                f"{self._failures} failures in a row)", sent=False)
        self._probing = True
        log.info("V3 circuit breaker half-open: one probe call goes through")
        return Ticket(probe=True, period=self._period)

    def record(self, ticket: Ticket, *, down: bool) -> None:
        """How an attempt ended: `down`, a failure that says V3 is down; else V3 answered."""
        if down:
            self._failed(ticket)
        elif ticket.probe:
            self._close("V3 answered the probe")
        elif ticket.period == self._period and self._opened_at is None:
            self._streak = 0

    def observe(self, *, down: bool) -> None:
        """How a call that did not ask `admit()` ended (a poll, which always tries)."""
        if down:
            self._failed(Ticket(probe=False, period=self._period))
        elif self._opened_at is not None:
            self._close("V3 answered a poll")
        else:
            self._streak = 0

    def abandon(self, ticket: Ticket) -> None:
        """An attempt that says nothing about V3 (cancelled, a bug): a probe's place is freed."""
        if ticket.probe and ticket.period == self._period:
            self._probing = False

    def _failed(self, ticket: Ticket) -> None:
        now = self._clock()
        if ticket.probe:
            return self._open(now, "the probe call failed")
        if not self._failures or ticket.period != self._period or self._opened_at is not None:
            return None
        if self._streak == 0 or now - self._streak_started > self._window:
            self._streak, self._streak_started = 0, now
        self._streak += 1
        if self._streak >= self._failures:
            self._open(now, f"{self._streak} failures in a row")
        return None

    def _open(self, now: float, why: str) -> None:
        self._opened_at, self._probing, self._streak = now, False, 0
        self._period += 1
        log.warning("V3 circuit breaker open: calls fail fast", why=why, cooldown=self._cooldown)

    def _close(self, why: str) -> None:
        self._opened_at, self._probing, self._streak = None, False, 0
        log.info("V3 circuit breaker closed", why=why)
