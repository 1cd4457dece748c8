"""The usage store's hot path: each call adds to counters in memory, per client and hour; a
flusher takes them every second (`take`) and hands them to the store, off the hot path.

What is counted, per (client, hour), as named counts (the store's fields):

    v2|<endpoint>|<code>        V2 calls by endpoint (upscale, progress, images, unknown) and V2 code
    feature|<name>|<decision>   features V3 lacks, by what the proxy did (emulate, approximate, a
                                unit's own word, or refused)
    jobs                        the V3 jobs the V2 calls cost
    v3|<method>|<status>        calls on the /v3 pass-through: a client moving to V3
    ua|<user agent>             user agents, the first UA_TOP of an hour by name, the rest as ua|other
    shadow|<outcome>            shadow comparisons: match, explained, mismatch, error
    shadowf|<name>|<outcome>    the features that explained a comparison's difference
    body|<shape>                the V2 bodies' shapes (fields but the image, and the image's format
                                and size), the first SHAPES_TOP of an hour: the snippets' source

and when the client was first seen, and its last V2 and /v3 calls. A failed flush gives its counts
back (`put_back`), so nothing is lost while the store is away; past MAX_CLIENTS clients in one
batch, the rest count as "other".
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

HOUR = 3600
UA_TOP = 10  # user agents named per client and hour; the rest are "other"
SHAPES_TOP = 5  # body shapes kept per client and hour
MAX_CLIENTS = 10_000  # clients per batch (a second); the rest are "other"
UNIDENTIFIED = "unidentified"  # calls without a key
OTHER = "other"
Key = tuple[str, int]  # (client, hour: epoch seconds of its start)


@dataclass(slots=True)
class Tally:
    """One client's hour: named counts, when it was first seen, and its last V2 and /v3 calls
    (epoch seconds; 0: none)."""

    counts: Counter[str] = field(default_factory=Counter)
    first: float = 0.0
    last_v2: float = 0.0
    last_v3: float = 0.0

    def merge(self, other: Tally) -> None:
        self.counts.update(other.counts)
        self.first = min(t for t in (self.first, other.first) if t) if self.first or other.first else 0.0
        self.last_v2 = max(self.last_v2, other.last_v2)
        self.last_v3 = max(self.last_v3, other.last_v3)


def v2_field(endpoint: str, code: int) -> str:
    return f"v2|{endpoint}|{code}"


def feature_field(name: str, decision: str) -> str:
    return f"feature|{name}|{decision}"


def v3_field(method: str, status: int) -> str:
    return f"v3|{method}|{status}"


# kinds with a bounded number of distinct names per client and hour (the store keeps the bound):
# past it a user agent counts as ua|other, and a body shape is not kept
BOUNDS = {"ua": UA_TOP, "body": SHAPES_TOP}


class Tallies:
    """Counts since the last flush. Not thread-safe: the event loop's, like the app."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._batch: dict[Key, Tally] = {}

    def __len__(self) -> int:
        return len(self._batch)

    def _tally(self, client: str | None, now: float) -> Tally:
        client = client or UNIDENTIFIED
        key = (client, int(now // HOUR) * HOUR)
        tally = self._batch.get(key)
        if tally is None:
            if len(self._batch) >= MAX_CLIENTS:
                key = (OTHER, key[1])
                tally = self._batch.get(key)
            if tally is None:
                tally = self._batch[key] = Tally(first=now)
        return tally

    def v2_call(self, client: str | None, endpoint: str, code: int, user_agent: str,
                features: Mapping[str, str] | None = None, jobs: int = 0, shape: str | None = None) -> None:
        """One answered V2 call (the audit event's facts)."""
        now = self._clock()
        tally = self._tally(client, now)
        tally.last_v2 = now
        counts = tally.counts
        counts[v2_field(endpoint, code)] += 1
        counts[f"ua|{user_agent or '(none)'}"] += 1
        if features:
            for name, decision in features.items():
                counts[feature_field(name, decision)] += 1
        if jobs:
            counts["jobs"] += jobs
        if shape is not None:
            counts[f"body|{shape}"] += 1

    def v3_call(self, client: str | None, method: str, status: int) -> None:
        """One call on the /v3 pass-through."""
        now = self._clock()
        tally = self._tally(client, now)
        tally.last_v3 = now
        tally.counts[v3_field(method, status)] += 1

    def shadow(self, client: str | None, outcome: str, features: tuple[str, ...] = ()) -> None:
        """A shadow comparison's outcome (match, explained, mismatch, error), and the features that
        explained it."""
        counts = self._tally(client, self._clock()).counts
        counts[f"shadow|{outcome}"] += 1
        for name in features:
            counts[f"shadowf|{name}|{outcome}"] += 1

    def take(self) -> dict[Key, Tally]:
        """What was counted since the last take; counting starts afresh."""
        batch, self._batch = self._batch, {}
        return batch

    def put_back(self, batch: dict[Key, Tally]) -> None:
        """A batch the store could not take: it goes out with the next one."""
        for key, tally in batch.items():
            mine = self._batch.get(key)
            if mine is None:
                self._batch[key] = tally
            else:
                mine.merge(tally)
