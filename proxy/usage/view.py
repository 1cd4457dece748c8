"""What the dashboard, `GET /_proxy/usage` (JSON and CSV) and `audit --store` read: one function
per view, over the usage store, so the page, its JSON and its CSV can never disagree.

Filters are query parameters (a view is a URL to bookmark): `days` (the period, ending now),
`readiness`, `q` (a label or fingerprint, or part of one), `sort` and `order`; with a legacy V2,
`stage` (the client's migration stage, which the context's `stages` gives each row).
"""

from __future__ import annotations

import csv
import io
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal
from urllib.parse import urlencode

import orjson

from proxy.migration.stages import STAGES
from proxy.translate.features import BY_NAME
from proxy.usage.readiness import DAY, READINESS, Verdict, readiness
from proxy.usage.stores import ClientSeen, HourCounts, UsageStore

PERIODS = (1, 7, 30, 90, 400)  # days the dashboard offers
SORTS = ("calls", "last_seen", "v3_share", "client", "readiness")
CSV_COLUMNS = ("client", "label", "readiness", "deadline", "days_left", "v2_calls", "v3_calls", "v3_share",
               "v3_jobs", "first_seen", "last_seen", "last_v2", "last_v3", "features", "blocking", "user_agents",
               "stage")


class BadFilter(ValueError):
    """A filter the view can't take; its message names the parameter."""


@dataclass(frozen=True)
class Filters:
    days: int = 30
    readiness: str | None = None
    q: str = ""
    sort: str = "calls"
    order: Literal["asc", "desc"] = "desc"
    stage: str | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> Filters:
        try:
            days = int(query.get("days", "30"))
        except ValueError:
            raise BadFilter("days: a whole number of days") from None
        if not 1 <= days <= 3660:
            raise BadFilter("days: from 1 to 3660")
        state = query.get("readiness") or None
        if state is not None and state not in READINESS:
            raise BadFilter(f"readiness: one of {', '.join(READINESS)}")
        sort = query.get("sort", "calls")
        if sort not in SORTS:
            raise BadFilter(f"sort: one of {', '.join(SORTS)}")
        order = query.get("order", "asc" if sort == "client" else "desc")
        if order not in ("asc", "desc"):
            raise BadFilter("order: asc or desc")
        stage = query.get("stage") or None
        if stage is not None and stage not in STAGES:
            raise BadFilter(f"stage: one of {', '.join(STAGES)}")
        return cls(days, state, query.get("q", "").strip()[:200], sort, order, stage)  # type: ignore[arg-type]

    def query(self, **changes) -> str:
        """This view's query string, with some filters changed (for links)."""
        doc = {"days": self.days, "readiness": self.readiness, "q": self.q, "sort": self.sort, "order": self.order,
               "stage": self.stage}
        doc.update(changes)
        return urlencode({k: v for k, v in doc.items() if v not in (None, "")})


@dataclass(frozen=True)
class Context:
    """What a view needs besides the store: the clock's reading, the rules and the names."""

    now: float
    window_days: int  # UPSCALE_PROXY_MIGRATED_AFTER_DAYS
    sunset: datetime | None
    labels: Mapping[str, str] = field(default_factory=dict)  # from the settings; the store's win
    brownouts: tuple[tuple[datetime, datetime, float], ...] = ()
    stages: Callable[[str], dict | None] | None = None  # a client's migration rule, with a legacy V2


@dataclass
class _Client:
    """One client over the period: what its hours add up to."""

    seen: ClientSeen
    counts: Counter[str] = field(default_factory=Counter)  # over the period
    window: Counter[str] = field(default_factory=Counter)  # over the readiness window
    daily: Counter[int] = field(default_factory=Counter)  # day -> V2 calls
    daily_v3: Counter[int] = field(default_factory=Counter)


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if t else ""


def day_of(t: float) -> int:
    return int(t // DAY) * DAY


def _sum(counts: Counter[str], kind: str) -> int:
    return sum(n for name, n in counts.items() if name.startswith(kind))


def _by(counts: Counter[str], kind: str, part: int) -> dict[str, int]:
    """Counts of one kind, by one part of the field's name (`v2|<endpoint>|<code>`: 1 or 2)."""
    out: Counter[str] = Counter()
    for name, n in counts.items():
        if name.startswith(kind + "|"):
            out[name.split("|", 2)[part] if kind != "ua" else name[3:]] += n
    return dict(out.most_common())


def _features(counts: Counter[str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for name, n in counts.items():
        if name.startswith("feature|"):
            _, feature, decision = name.split("|", 2)
            out[feature][decision] = out[feature].get(decision, 0) + n
    # a feature V3 does its own way ("same") asks nothing of the client: left out, as in `audit`
    return {name: out[name] for name, unit in BY_NAME.items() if name in out and unit.verdict != "same"}


def _nested(counts: Counter[str], kind: str) -> dict[str, dict[str, int]]:
    """Counts named `<kind>|<name>|<part>`, as name -> part -> n."""
    out: dict[str, Counter[str]] = defaultdict(Counter)
    for name, n in counts.items():
        if name.startswith(kind + "|"):
            _, inner, part = name.split("|", 2)
            out[inner][part] += n
    return {inner: dict(parts) for inner, parts in out.items()}


def _fields(counts: Counter[str]) -> dict[str, int]:
    """The V2 fields the client's bodies set, from the body shapes kept (those past an hour's
    SHAPES_TOP are not counted)."""
    out: Counter[str] = Counter()
    for name, n in counts.items():
        if name.startswith("body|"):
            fields = orjson.loads(name[5:])["fields"]
            out.update({field: n for field, value in fields.items() if value is not None})
    return dict(out.most_common())


async def _load(store: UsageStore, ctx: Context, days: int) -> tuple[dict[str, _Client], dict[str, str]]:
    """Every client the store knows, with its counts over the period and the readiness window."""
    until = int(ctx.now // 3600) * 3600 + 3600
    since = min(ctx.now - days * DAY, ctx.now - ctx.window_days * DAY)
    period_start, window_start = ctx.now - days * DAY, ctx.now - ctx.window_days * DAY
    clients = {seen.client: _Client(seen) for seen in await store.clients()}
    rows: list[HourCounts] = await store.hours(int(since // 3600) * 3600, until)
    for row in rows:
        client = clients.get(row.client)
        if client is None:  # counts whose summary expired first (Redis): known from its hours alone
            client = clients[row.client] = _Client(ClientSeen(row.client, row.hour, 0, 0))
        in_period, in_window = row.hour + 3600 > period_start, row.hour + 3600 > window_start
        for name, n in row.counts.items():
            if in_period:
                client.counts[name] += n
            if in_window:
                client.window[name] += n
        if in_period:
            client.daily[day_of(row.hour)] += _sum(Counter(row.counts), "v2|")
            client.daily_v3[day_of(row.hour)] += _sum(Counter(row.counts), "v3|")
    labels = {**ctx.labels, **await store.labels()}
    return clients, labels


def _verdict(client: _Client, ctx: Context) -> Verdict:
    return readiness(last_v2=client.seen.last_v2, last_v3=client.seen.last_v3,
                     features=_features(client.window), now=ctx.now, window_days=ctx.window_days,
                     sunset=ctx.sunset)


def _row(client: _Client, label: str, ctx: Context) -> dict:
    counts, seen = client.counts, client.seen
    v2, v3 = _sum(counts, "v2|"), _sum(counts, "v3|")
    verdict = _verdict(client, ctx)
    return {
        "client": seen.client, "label": label,
        "readiness": verdict.readiness, "deadline": verdict.deadline, "days_left": verdict.days_left,
        "blocking": list(verdict.blocking),
        "v2_calls": v2, "v3_calls": v3, "v3_share": round(v3 / (v2 + v3), 3) if v2 + v3 else 0.0,
        "v3_jobs": counts.get("jobs", 0),
        "first_seen": iso(seen.first), "last_seen": iso(max(seen.last_v2, seen.last_v3)),
        "last_v2": iso(seen.last_v2), "last_v3": iso(seen.last_v3),
        "endpoints": _by(counts, "v2", 1), "v2_codes": _by(counts, "v2", 2), "v3_calls_by_status": _by(counts, "v3", 2),
        "features": _features(counts), "user_agents": _by(counts, "ua", 1), "fields": _fields(counts),
        "shadow": _by(counts, "shadow", 1),  # shadow comparisons by outcome (proxy/migration)
        "shadow_features": _nested(counts, "shadowf"),  # feature -> outcome -> comparisons it explained
        **({"migration": ctx.stages(seen.client)} if ctx.stages else {}),
    }


def _matches(row: dict, f: Filters) -> bool:
    if f.readiness and row["readiness"] != f.readiness:
        return False
    if f.stage and (row.get("migration") or {}).get("stage") != f.stage:
        return False
    q = f.q.lower()
    return not q or q in row["client"].lower() or q in row["label"].lower()


def _sort_key(row: dict, sort: str):
    if sort == "calls":
        return row["v2_calls"] + row["v3_calls"]
    if sort == "client":
        return (row["label"] or row["client"]).lower()
    if sort == "readiness":
        return READINESS.index(row["readiness"])
    return row[sort]


async def clients(store: UsageStore, ctx: Context, f: Filters) -> dict:
    """The clients table (and /_proxy/usage): one row per client seen in the period, filtered and
    sorted, with the totals of all of them."""
    return _table(*await _load(store, ctx, f.days), ctx, f)


def _table(loaded: dict[str, _Client], labels: Mapping[str, str], ctx: Context, f: Filters) -> dict:
    period_start = ctx.now - f.days * DAY
    rows = [_row(c, labels.get(name, ""), ctx) for name, c in loaded.items()
            if max(c.seen.last_v2, c.seen.last_v3) >= period_start or c.counts]
    by_readiness = Counter(row["readiness"] for row in rows)
    shown = sorted((r for r in rows if _matches(r, f)), key=lambda r: _sort_key(r, f.sort), reverse=f.order == "desc")
    return {
        "generated_at": iso(ctx.now), "days": f.days, "since": iso(period_start),
        "filters": {"readiness": f.readiness, "q": f.q, "sort": f.sort, "order": f.order},
        "sunset": ctx.sunset.isoformat() if ctx.sunset else None, "migrated_after_days": ctx.window_days,
        "totals": {"clients": len(rows), "shown": len(shown), "v2_calls": sum(r["v2_calls"] for r in rows),
                   "v3_calls": sum(r["v3_calls"] for r in rows),
                   "by_readiness": {state: by_readiness.get(state, 0) for state in READINESS},
                   **({"by_stage": {stage: sum(1 for r in rows if (r["migration"] or {}).get("stage") == stage)
                                    for stage in STAGES}} if ctx.stages else {})},
        "clients": shown,
    }


def as_csv(view: dict) -> str:
    """The clients table as CSV: the same rows as the JSON, for the same filters and period."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for row in view["clients"]:
        flat = {**row, "features": " ".join(row["features"]), "blocking": " ".join(row["blocking"]),
                "stage": (row.get("migration") or {}).get("stage"),
                "user_agents": "; ".join(f"{ua} ({n})" for ua, n in row["user_agents"].items())}
        writer.writerow(["" if flat[c] is None else flat[c] for c in CSV_COLUMNS])
    return out.getvalue()


async def overview(store: UsageStore, ctx: Context, f: Filters) -> dict:
    """The overview: V2 and /v3 calls per day over the period, clients by readiness, and the
    burn-down of V2 calls projected to the sunset (a straight line fitted to the days so far)."""
    loaded, labels = await _load(store, ctx, f.days)
    table = _table(loaded, labels, ctx, Filters(days=f.days))
    first_day = day_of(ctx.now - (f.days - 1) * DAY)
    days = list(range(first_day, day_of(ctx.now) + DAY, DAY))
    v2 = [sum(c.daily.get(d, 0) for c in loaded.values()) for d in days]
    v3 = [sum(c.daily_v3.get(d, 0) for c in loaded.values()) for d in days]
    return {
        **{k: table[k] for k in ("generated_at", "days", "since", "sunset", "migrated_after_days", "totals")},
        "daily": {"days": days, "v2": v2, "v3": v3},
        "burn_down": burn_down(days[:-1], v2[:-1], ctx.sunset),  # today is not over: fitted on whole days
        "brownouts": [{"start": s.isoformat(), "end": e.isoformat(), "fraction": fr} for s, e, fr in ctx.brownouts],
        "top_clients": table["clients"][:10],
    }


def burn_down(days: list[int], calls: list[int], sunset: datetime | None) -> dict:
    """The least-squares line through the V2 calls per day, from the first day with any, carried
    forward to the sunset (or 90 days): where it reaches zero, and what would still call V2 on
    sunset day. The days before the first call are no traffic's decline: they are left out."""
    first = next((i for i, n in enumerate(calls) if n), len(calls))
    days, calls = days[first:], calls[first:]
    n = len(days)
    if n < 2 or not any(calls):
        return {"days": [], "projected": [], "zero_day": None, "at_sunset": None}
    mean_x, mean_y = sum(days) / n, sum(calls) / n
    var = sum((x - mean_x) ** 2 for x in days)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(days, calls, strict=True)) / var if var else 0.0
    line = lambda x: max(mean_y + slope * (x - mean_x), 0.0)  # noqa: E731
    end = day_of(sunset.timestamp()) if sunset else days[-1] + 90 * DAY
    end = max(end, days[-1])
    future = list(range(days[0], end + DAY, DAY))
    zero = None if slope >= 0 else mean_x - mean_y / slope
    return {"days": future, "projected": [round(line(x), 1) for x in future],
            "zero_day": iso(day_of(zero)) if zero is not None else None,
            "at_sunset": round(line(day_of(sunset.timestamp())), 1) if sunset else None}


async def client(store: UsageStore, ctx: Context, name: str, days: int = 30) -> dict | None:
    """One client: its row, its calls per day, the body shapes it sends most, and each feature it
    uses with what V3 offers instead. None if the store has never seen it."""
    loaded, labels = await _load(store, ctx, days)
    found = loaded.get(name)
    if found is None:
        return None
    row = _row(found, labels.get(name, ""), ctx)
    first_day = day_of(ctx.now - (days - 1) * DAY)
    series_days = list(range(first_day, day_of(ctx.now) + DAY, DAY))
    shapes = Counter({k[5:]: n for k, n in found.counts.items() if k.startswith("body|")})
    return {
        **row, "days": days, "sunset": ctx.sunset.isoformat() if ctx.sunset else None,
        "daily": {"days": series_days, "v2": [found.daily.get(d, 0) for d in series_days],
                  "v3": [found.daily_v3.get(d, 0) for d in series_days]},
        "shapes": [{"shape": shape, "calls": n} for shape, n in shapes.most_common()],
        "feature_help": [{"name": name, "summary": BY_NAME[name].summary(), "verdict": BY_NAME[name].verdict,
                          "v3": BY_NAME[name].v3, "decisions": decisions}
                         for name, decisions in row["features"].items()],
    }


async def features(store: UsageStore, ctx: Context, f: Filters) -> dict:
    """Each feature V3 lacks or changes: the clients that use it, and what V3 would have to add,
    ranked by the clients it blocks."""
    table = await clients(store, ctx, Filters(days=f.days))
    out = []
    for name, unit in BY_NAME.items():
        users = [r for r in table["clients"] if name in r["features"]]
        shadow: Counter[str] = Counter()  # comparisons whose difference this feature explained
        for r in table["clients"]:
            shadow.update(r["shadow_features"].get(name, {}))
        if not users and not shadow and unit.verdict == "same":
            continue
        out.append({
            "name": name, "summary": unit.summary(), "verdict": unit.verdict, "v3": unit.v3,
            "calls": sum(sum(r["features"][name].values()) for r in users),
            "clients": [{"client": r["client"], "label": r["label"], "readiness": r["readiness"]} for r in users],
            "blocked_clients": sum(1 for r in users if name in r["blocking"]),
            "shadow": dict(shadow.most_common()),
        })
    out.sort(key=lambda f: (-f["blocked_clients"], -len(f["clients"]), f["name"]))
    return {**{k: table[k] for k in ("generated_at", "days", "since")}, "features": out}
