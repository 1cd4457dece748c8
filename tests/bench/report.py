"""Issue 11's figures from one tests/bench/run.sh run, as ONE markdown table with their targets.

Reads the run's JSON lines (perfkit's measure.py lines for `bare-uvloop`, `proxy`, `proxy-cached`,
`workers1`, `workers2`; tests/bench/settle.py's `settle` line; the `compose` line with
tests/bench/pillow.py's numbers; the `machine` line) and prints | figure | bare-uvloop | proxy |
ratio | target | met |, then notes (errors, a saturated load core) and the machine. A point
measured more than once (several files, one per run, or a RUN name reused): the median of each
figure, errors summed; the settle and composition lines: the last one.

    .venv/bin/python -m tests.bench.report tests/bench/results/RUN.jsonl [--md tests/bench/results/RUN.md]
    .venv/bin/python -m tests.bench.report tests/bench/results/r1.jsonl tests/bench/results/r2.jsonl ...
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

LOADS = {"small": "64 KB submissions", "get": "polls", "large": "4 MB submissions"}
BASE = "bare-uvloop"


@dataclass
class Row:
    figure: str
    base: str = "—"
    proxy: str = "—"
    ratio: str = "—"
    target: str = "info"
    met: str = ""

    def cells(self) -> list[str]:
        return [self.figure, self.base, self.proxy, self.ratio, self.target, self.met]


def merge(records: list[dict]) -> dict:
    """Several measures of one point (several runs): the median of each figure, errors summed."""
    out = dict(records[-1], runs=len(records))
    for key, value in records[-1].items():
        if key == "errors":
            out[key] = sum(r.get(key) or 0 for r in records)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
            out[key] = statistics.median(values)
        elif key == "core_busy_pct":
            out[key] = {cpu: statistics.median(r[key][cpu] for r in records if cpu in r.get(key, {})) for cpu in value}
    return out


def load(files: list[str]) -> tuple[dict, dict]:
    """-> {(target, load, "c1" | "sat"): record, the median of its measures}, {special target: record}."""
    points, special = defaultdict(list), {}
    for path in files:
        for line in Path(path).read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            if r["target"] == "machine":
                special.setdefault("runs", []).append(r.get("run", "?"))
            if r["target"] in ("machine", "settle", "compose"):
                special[r["target"]] = r
            else:
                points[(r["target"], r["load"], "c1" if r["conc"] == 1 else "sat")].append(r)
    return {key: merge(records) for key, records in points.items()}, special


def num(v: float | None, digits: int = 0) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def verdict(ok: bool | None) -> str:
    return "—" if ok is None else "yes" if ok else "**NO**"


def get(points: dict, target: str, load: str, mode: str, key: str) -> float | None:
    r = points.get((target, load, mode))
    return None if r is None else r.get(key)


def throughput(points: dict, load: str, minimum: float, proxy: str = "proxy", note: str = "") -> Row:
    b, p = get(points, BASE, load, "sat", "rps"), get(points, proxy, load, "sat", "rps")
    conc = (points.get((proxy, load, "sat")) or points.get((BASE, load, "sat")) or {}).get("conc", "?")
    ratio = p / b if b and p else None
    return Row(f"{LOADS[load]} req/s, c={conc}{note}", num(b), num(p), num(ratio, 2) + "x" if ratio else "—",
               f"≥ {minimum:.2f}x", verdict(None if ratio is None else ratio >= minimum))


def added_p50(points: dict, load: str, limit: float, proxy: str = "proxy", note: str = "",
              beat: bool = False) -> Row:
    b, p = get(points, BASE, load, "c1", "p50_ms"), get(points, proxy, load, "c1", "p50_ms")
    added = p - b if b is not None and p is not None else None
    return Row(f"added p50 at c=1, {LOADS[load]}{note} (ms)", num(b, 3), num(p, 3),
               "—" if added is None else f"{added:+.3f} ms",
               "< 0 ms (faster)" if beat else f"≤ +{limit:g} ms",
               verdict(None if added is None else added < 0 if beat else added <= limit))


def cpu(points: dict, load: str) -> Row:
    b, p = get(points, BASE, load, "sat", "sut_cpu_us_per_req"), get(points, "proxy", load, "sat", "sut_cpu_us_per_req")
    return Row(f"CPU µs per request, {LOADS[load]}", num(b), num(p), num(p / b, 2) + "x" if b and p else "—",
               "info", "")


def rows(points: dict, special: dict) -> list[Row]:
    out = [throughput(points, "small", 0.9), throughput(points, "get", 0.95, note=" (cache off, unique ids)"),
           throughput(points, "large", 1.0),
           added_p50(points, "small", 0.1), added_p50(points, "get", 0.1, note=" (cache off)"),
           added_p50(points, "large", 1.0)]
    out += [cpu(points, load) for load in LOADS]

    b, p = get(points, BASE, "large", "sat", "sut_vmhwm_mb"), get(points, "proxy", "large", "sat", "sut_vmhwm_mb")
    ratio = p / b if b and p else None
    out.append(Row("peak RSS (VmHWM) with 8 x 4 MB in flight (MB)", num(b, 1), num(p, 1),
                   num(ratio, 2) + "x" if ratio else "—", "≤ 1.50x", verdict(None if ratio is None else ratio <= 1.5)))

    s = special.get("settle")
    if s:
        over = s["rss_settled_mb"] - s["rss_idle_mb"]
        out.append(Row(f"RSS {s['settle_s']} s after 8 x 4 MB for {s['load_wall_s']:g} s, minus idle (MB)", "—",
                       f"idle {s['rss_idle_mb']:.1f}, after {s['rss_after_load_mb']:.1f}, "
                       f"+{s['settle_s']} s {s['rss_settled_mb']:.1f}", f"{over:+.1f} MB", "≤ +50 MB",
                       verdict(over <= 50) + ("" if s["settle_s"] >= 60 else f" (waited {s['settle_s']} s, not 60)")))
    else:
        out.append(Row("RSS a minute after 8 x 4 MB, minus idle (MB)", target="≤ +50 MB", met="not measured"))

    out.append(throughput(points, "get", 1.0, proxy="proxy-cached", note=" (proxy: cache on, one task id)"))
    out[-1].target = "> 1.00x"
    rps = (get(points, "proxy-cached", "get", "sat", "rps"), get(points, BASE, "get", "sat", "rps"))
    out[-1].met = verdict(None if None in rps else rps[0] > rps[1])
    out.append(added_p50(points, "get", 0, proxy="proxy-cached", note=" (proxy: cache on, one task id)", beat=True))

    for load in ("get", "small"):
        w1, w2 = get(points, "workers1", load, "sat", "rps"), get(points, "workers2", load, "sat", "rps")
        note = " (cache off, unique ids)" if load == "get" else ""
        out.append(Row(f"serve --workers 2 / 1, {LOADS[load]} req/s{note}, not pinned "
                       "(columns: workers=1, workers=2)", num(w1), num(w2),
                       num(w2 / w1, 2) + "x" if w1 and w2 else "—", "info", ""))

    c = special.get("compose")
    if c and "pillow" in c:
        for kind, entry in c["pillow"].items():
            for level, t in entry.get("levels", {}).items():
                ratio = t["compose_ms"] / t["pillow_ms"] if t.get("pillow_ms") else None
                out.append(Row(f"composition 2048 x 2048, {kind} image, PNG level {level}: compose() ms "
                               "(columns: Pillow alone, compose())", num(t["pillow_ms"], 1), num(t["compose_ms"], 1),
                               num(ratio, 2) + "x" if ratio else "—", "≤ 1.20x",
                               verdict(None if ratio is None else ratio <= 1.2)))
    else:
        why = (c or {}).get("error", "tests/bench/pillow.py not run")
        out.append(Row("composition: last V3 result → stored PNG vs Pillow alone", target="≤ 1.20x",
                       met=f"**not measured** ({why})"))
    return out


def notes(points: dict, special: dict) -> list[str]:
    out = []
    errors = {}
    for (target, load, mode), r in points.items():
        if r.get("errors"):
            errors[f"{target} {load} {'c=1' if mode == 'c1' else 'c=' + str(r['conc'])}"] = r["errors"]
    if special.get("settle", {}).get("errors"):
        errors["settle"] = special["settle"]["errors"]
    if errors:
        out.append("errors (wrk: connect/read/write/status/timeout): "
                   + ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())))
    m = special.get("machine", {})
    sut, lc = f"cpu{m.get('sut_cpu', 1)}", f"cpu{m.get('load_cpu', 0)}"
    busy = [f"{t} {load} ({r['core_busy_pct'].get(lc)}%)" for (t, load, mode), r in sorted(points.items())
            if mode == "sat" and (r.get("core_busy_pct") or {}).get(lc, 0) >= 95]
    if busy:
        out.append(f"load core (wrk + upstream, {lc}) saturated, so req/s there is capped by the load, not the "
                   "target; compare CPU µs per request: " + ", ".join(busy))
    # the target alone on its core: the core busy far beyond the target's own CPU is someone else
    crowded = [f"{t} {load} {'c=1' if mode == 'c1' else 'c=' + str(r['conc'])} (core {r['core_busy_pct'][sut]}%, "
               f"target {r['sut_cpu_pct']}%)" for (t, load, mode), r in sorted(points.items())
               if not t.startswith("workers") and r.get("sut_cpu_pct") is not None and sut in r.get("core_busy_pct", {})
               and r["core_busy_pct"][sut] - r["sut_cpu_pct"] >= 20]
    if crowded:
        out.append(f"the target's core ({sut}) was busy 20+ points beyond the target's own CPU (another process, "
                   "or kernel work not charged to it) during: " + ", ".join(crowded)
                   + "; if it was a neighbour, those points are not the target's own figures: run again")
    steal = [r.get("steal_pct") or 0 for r in points.values()]
    if steal and max(steal) >= 5:
        out.append(f"CPU steal up to {max(steal):.1f}% during a point: a noisy neighbour, run again")
    return out


def machine_line(special: dict, points: dict) -> str:
    m = special.get("machine")
    if m is None:
        from tests.bench.common import machine
        m = {**machine(), "date": "(not recorded; reported) " + machine()["date"]}
    runs = special.get("runs") or [m.get("run") or next((r["run"] for r in points.values()), "?")]
    run = runs[0] if len(runs) == 1 else f"{', '.join(runs)} (medians of {len(runs)} runs; the last run's settle, compositions)"
    sat = [r["duration_s"] for (t, _, mode), r in points.items() if mode == "sat"]
    c1 = [r["duration_s"] for (t, _, mode), r in points.items() if mode == "c1"]
    points_note = (f"; about {round(max(sat))} s per point, {round(max(c1))} s at c=1" if sat and c1 else "")
    return (f"Run `{run}` on {m['date']}: {m['nproc']} CPUs (nproc), {m['cpu_model']}, kernel {m['kernel']}, "
            f"Python {m['python']}, aiohttp {m['aiohttp']}, uvloop {m['uvloop']}{points_note}. The proxy and "
            f"{BASE} alone on cpu{m.get('sut_cpu', 1)}, wrk and perfkit's fake upstream on cpu{m.get('load_cpu', 0)} "
            "(workers rows: the proxy not pinned).")


def render(files: list[str]) -> str:
    points, special = load(files)
    head = ["figure", BASE, "proxy", "ratio", "target", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows(points, special)]
    extra = notes(points, special)
    return "\n".join(lines + [""] + [f"- {n}" for n in extra] + ([""] if extra else []) + [machine_line(special, points)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="the run's JSON lines (several runs: medians)")
    p.add_argument("--md", help="also write the table here")
    a = p.parse_args()
    text = render(a.files)
    print(text)
    if a.md:
        Path(a.md).write_text(text + "\n")


if __name__ == "__main__":
    main()
