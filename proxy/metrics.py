"""Prometheus metrics, one registry per app (so several apps in one process don't collide).

Under `serve --workers N` (PROMETHEUS_MULTIPROC_DIR set by the parent process), prometheus-client's
multiprocess mode: every worker writes its values to files there, and /metrics, whichever worker
answers it, adds them all up.

The counters every V2 call moves (calls, clients, poll outcomes, calls in flight) are plain
integers on the hot path, added to prometheus-client's metrics by `flush`: at each scrape this
process answers and every FLUSH_EVERY seconds (proxy/app.py), so another worker's scrape is at
most that far behind. A prometheus-client increment takes a lock and checks its labels each time:
per call, it was the largest single cost of the proxy's own (issue 11)."""

from __future__ import annotations

import collections
import os
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

disable_created_metrics()  # the *_created series double the output and no dashboard uses them

FLUSH_EVERY = 1.0  # seconds
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def multiprocess() -> bool:
    """Several worker processes share the metrics (set before prometheus_client is imported)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class _ReadAtScrape(Gauge):
    """A gauge whose value a function gives. In multiprocess mode a function is not written to the
    shared files: its value is set from the function at each scrape of this worker."""

    _function: Callable[[], float] | None = None

    def set_function(self, f: Callable[[], float]) -> None:
        super().set_function(f)
        self._function = f

    def refresh(self) -> None:
        if self._function is not None:
            self.set(self._function())


class Metrics:
    def __init__(self, max_clients: int = 100) -> None:
        r = self.registry = CollectorRegistry()
        self.v2_calls = Counter("upscale_proxy_v2_calls", "V2 calls by endpoint, path taken and V2 code",
                                ["endpoint", "path", "code"], registry=r)
        self.client_calls = Counter(
            "upscale_proxy_v2_client_calls",
            "V2 calls by key fingerprint; past the first clients seen, the rest count as 'other'",
            ["client"], registry=r)
        self.upstream_seconds = Histogram("upscale_proxy_upstream_seconds", "V3 call latency, by call",
                                          ["call"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("upscale_proxy_in_flight_requests", "V2 and V3 requests being handled",
                               registry=r, multiprocess_mode="livesum")
        self.composed_tasks = Counter("upscale_proxy_composed_tasks", "composed tasks by state reached",
                                      ["state"], registry=r)
        # proxy/compose/engine.py: past MAX_DELIVERED, the oldest webhook result goes (its task asks V3)
        self.webhook_results_evicted = Counter(
            "upscale_proxy_webhook_results_evicted",
            "webhook results of composed tasks dropped from a process's memory, oldest first, past its bound",
            registry=r)
        self.v3_passthrough = Counter("upscale_proxy_v3_passthrough", "V3 calls passed through, by status",
                                      ["method", "status"], registry=r)
        self.poll_cache = Counter("upscale_proxy_poll_cache", "direct-path polls by how they were answered",
                                  ["outcome"], registry=r)
        # polls answered without reaching V3 or the store, rare by nature (proxy/v2/last_known.py)
        self.poll_ride_through = Counter(
            "upscale_proxy_poll_ride_through",
            "polls that could not reach V3 or the task store, by answer: last_known, unseen, past_grace",
            ["answer"], registry=r)
        # the V3 client's circuit breaker (proxy/v3/breaker.py), read at each scrape
        self.v3_breaker = _ReadAtScrape(
            "upscale_proxy_v3_breaker_state",
            "V3 circuit breaker: 0 closed, 1 half-open (a probe may go), 2 open (calls fail fast)",
            registry=r, multiprocess_mode="livemax")
        # proxy/limits.py: submissions shed (code 5) past a limit: bytes | upstream_calls
        self.limits_refused = Counter("upscale_proxy_limits_refused",
                                      "V2 submissions refused at once by the process's limits, by limit",
                                      ["limit"], registry=r)
        # the usage store (proxy/usage): its clients by readiness, counted every minute (proxy/app.py;
        # every worker counts the same shared store); its flushes, read at each scrape
        self.clients = Gauge("upscale_proxy_clients",
                             "clients seen in the last 30 days, by readiness to leave V2 (as the dashboard counts)",
                             ["readiness"], registry=r, multiprocess_mode="livemostrecent")
        self.usage_flush_lag = _ReadAtScrape(
            "upscale_proxy_usage_flush_lag_seconds",
            "seconds since the usage store last took every count made here (about 1 when healthy)",
            registry=r, multiprocess_mode="livemax")
        self.usage_flush_errors = _ReadAtScrape(
            "upscale_proxy_usage_flush_errors",
            "usage store flushes that failed since the process started (their counts go with the next one)",
            registry=r, multiprocess_mode="livesum")
        self._max_clients = max_clients
        self._clients: set[str] = set()
        self._latency: dict[str, Histogram] = {}
        self.calls_in_flight = 0  # V2 and V3 calls being handled: the edge and the pass-through count
        # not yet flushed: label values -> calls
        self._calls: collections.Counter[tuple[str, str, int]] = collections.Counter()
        self._client_calls: collections.Counter[str] = collections.Counter()
        self._polls: collections.Counter[str] = collections.Counter()
        self._webhook_results_evicted = 0

    def count_v2_call(self, endpoint: str, path: str, code: int, fingerprint: str | None) -> None:
        """One V2 call, in both counters (at the next flush)."""
        self._calls[endpoint, path, code] += 1
        self._client_calls[self.client(fingerprint)] += 1

    def flush(self) -> None:
        """Add what the hot path counted to the Prometheus metrics."""
        for (endpoint, path, code), n in self._calls.items():
            self.v2_calls.labels(endpoint, path, code).inc(n)
        for client, n in self._client_calls.items():
            self.client_calls.labels(client).inc(n)
        for outcome, n in self._polls.items():
            self.poll_cache.labels(outcome).inc(n)
        self._calls.clear()
        self._client_calls.clear()
        self._polls.clear()
        if self._webhook_results_evicted:
            self.webhook_results_evicted.inc(self._webhook_results_evicted)
            self._webhook_results_evicted = 0
        self.in_flight.set(self.calls_in_flight)

    def client(self, fingerprint: str | None) -> str:
        """A bounded label for a client: its fingerprint while there is room, else 'other'."""
        if fingerprint is None:
            return "anonymous"
        if fingerprint in self._clients:
            return fingerprint
        if len(self._clients) < self._max_clients:
            self._clients.add(fingerprint)
            return fingerprint
        return "other"

    def count_poll(self, outcome: str) -> None:
        """A direct poll: miss (it called V3), shared (another poll's call), hit (a kept result)."""
        self._polls[outcome] += 1

    def set_clients_by_readiness(self, counts: dict[str, int]) -> None:
        for readiness, n in counts.items():
            self.clients.labels(readiness).set(n)

    def count_webhook_result_evicted(self) -> None:
        self._webhook_results_evicted += 1

    def observe_upstream(self, call: str, seconds: float) -> None:
        child = self._latency.get(call)
        if child is None:
            child = self._latency[call] = self.upstream_seconds.labels(call)
        child.observe(seconds)

    def exposition(self) -> bytes:
        self.flush()
        if not multiprocess():
            return generate_latest(self.registry)
        for gauge in (self.v3_breaker, self.usage_flush_lag, self.usage_flush_errors):
            gauge.refresh()  # this worker's; the others' as of their last scrape
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)
