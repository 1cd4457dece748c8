"""The usage report: who still calls V2, with what, and what each client team must change.

Reads the proxy's JSON log lines (the `v2.deprecated_call` events) and groups them by key
fingerprint: `upscale-v2-proxy audit [FILE|-] [--json]`. Or reads the usage store, which every
process and replica adds to (proxy/usage): `upscale-v2-proxy audit --store [--days N]`, the same
report from the store's hourly counts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import orjson

from proxy.translate.features import BY_NAME

EVENT = "v2.deprecated_call"


@dataclass
class Client:
    fingerprint: str
    calls: int = 0
    first_seen: str = ""
    last_seen: str = ""
    user_agents: Counter[str] = field(default_factory=Counter)
    endpoints: Counter[str] = field(default_factory=Counter)
    fields: Counter[str] = field(default_factory=Counter)
    features: Counter[str] = field(default_factory=Counter)
    codes: Counter[int] = field(default_factory=Counter)

    def add(self, event: dict) -> None:
        self.calls += 1
        when = event.get("timestamp", "")
        self.first_seen = min(self.first_seen or when, when)
        self.last_seen = max(self.last_seen, when)
        self.user_agents[event.get("user_agent") or "(none)"] += 1
        self.endpoints[event.get("endpoint") or "unknown"] += 1
        self.fields.update(event.get("fields") or ())
        self.features.update(list(event.get("features") or {}))  # the features used, not the decisions
        self.codes[event.get("v2_code", 0)] += 1


def read_events(lines: Iterable[bytes | str]) -> Iterable[dict]:
    """The audit events among the lines; anything else (other events, junk) is skipped."""
    for line in lines:
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(event, dict) and event.get("event") == EVENT:
            yield event


def report(events: Iterable[dict]) -> list[dict]:
    clients: dict[str, Client] = {}
    for event in events:
        fp = event.get("fingerprint") or "anonymous"
        clients.setdefault(fp, Client(fp)).add(event)
    rows = []
    for c in sorted(clients.values(), key=lambda c: -c.calls):
        uses = _uses(c.features)
        rows.append({
            "fingerprint": c.fingerprint, "calls": c.calls, "first_seen": c.first_seen,
            "last_seen": c.last_seen, "user_agents": dict(c.user_agents.most_common()),
            "endpoints": dict(c.endpoints.most_common()), "fields": dict(c.fields.most_common()),
            "features": uses, "v2_codes": {str(k): v for k, v in c.codes.most_common()}, "verdict": _verdict(uses),
        })
    return rows


def from_usage(clients: list[dict]) -> list[dict]:
    """The usage store's client rows (proxy/usage/view.py `clients`) as this report's rows, the
    clients that called V2 in the period only, busiest first."""
    rows = []
    for c in sorted((c for c in clients if c["v2_calls"]), key=lambda c: -c["v2_calls"]):
        uses = _uses(Counter({name: sum(decisions.values()) for name, decisions in c["features"].items()}))
        rows.append({
            "fingerprint": c["client"] + (f" ({c['label']})" if c["label"] else ""), "calls": c["v2_calls"],
            "first_seen": c["first_seen"], "last_seen": c["last_v2"], "user_agents": c["user_agents"],
            "endpoints": c["endpoints"], "fields": c["fields"], "features": uses, "v2_codes": c["v2_codes"],
            "verdict": _verdict(uses),
        })
    return rows


def _uses(features: Counter[str]) -> dict[str, dict]:
    """The features V3 lacks or changes among those used, with what V3 offers instead."""
    return {name: {"calls": n, "v3": BY_NAME[name].v3, "verdict": BY_NAME[name].verdict}
            for name, n in features.most_common() if name in BY_NAME and BY_NAME[name].verdict != "same"}


def _verdict(uses: dict[str, dict]) -> str:
    lacking = [name for name, u in uses.items() if u["verdict"] == "lacking"]
    changes = [name for name, u in uses.items() if u["verdict"] == "change"]
    if lacking:
        return "depends on features V3 lacks: " + ", ".join(lacking)
    if changes:
        return "needs these changes: " + ", ".join(changes)
    return "can switch to V3 as is"


def render(rows: list[dict]) -> str:
    """The report for people."""
    if not rows:
        return "no V2 calls in this log\n"
    out = [f"{len(rows)} client(s) still calling V2, busiest first", ""]
    for r in rows:
        out += [
            f"client {r['fingerprint']}: {r['calls']} calls, {r['first_seen']} .. {r['last_seen']}",
            f"  verdict:     {r['verdict']}",
            "  user agents: " + ", ".join(f"{ua} ({n})" for ua, n in r["user_agents"].items()),
            "  endpoints:   " + ", ".join(f"{e} ({n})" for e, n in r["endpoints"].items()),
            "  V2 fields:   " + (", ".join(f"{f} ({n})" for f, n in r["fields"].items()) or "-"),
            "  V2 codes:    " + ", ".join(f"{c} ({n})" for c, n in r["v2_codes"].items()),
        ]
        if r["features"]:
            out.append("  features V3 lacks or changes:")
            out += [f"    {name} ({u['calls']} calls): {u['v3']}" for name, u in r["features"].items()]
        out.append("")
    return "\n".join(out)
