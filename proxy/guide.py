"""The migration guide, generated from `mappings/` so that it can't drift from what the proxy does.
`upscale-v2-proxy guide` prints it; GET /_proxy/guide serves it (the Link rel="deprecation")."""

from __future__ import annotations

from collections import defaultdict

from proxy.mappings import Mappings
from proxy.translate.features import REGISTRY

FATES = {
    "direct": "same thing in V3, under another name",
    "emulated": "V3 has nothing like it; the proxy does it locally",
    "approximated": "V3 has something close",
    "unsupported": "V3 has nothing, and the proxy skips it",
}
SECTIONS = {
    "upscale": "`POST /v2/upscale` → `POST /v3/async/upscale`: request fields",
    "progress": "`GET /v2/progress` → `GET /v3/async/task-result`: reply fields",
    "errors": "Errors",
}


def guide(m: Mappings) -> str:
    out = [
        "# Moving from Upscale V2 to V3",
        "",
        "V2 (`POST /v2/upscale`, then polling `GET /v2/progress`) is deprecated. V3 is "
        "`POST /v3/async/upscale` with `{\"extra\": {...}, \"request\": {...}}`, then polling "
        "`GET /v3/async/task-result?task_id=`. Keys go in `Authorization: Bearer <key>`.",
        "This page is generated from the proxy's translation tables: it says what the proxy does.",
    ]
    for section, fields in m.fields.items():
        out += ["", f"## {SECTIONS[section]}", ""]
        for name, f in fields.items():
            out += [f"### `{name}` ({f.fate}: {FATES[f.fate]})", "", f"V3: `{f.v3}`. {f.note}", "",
                    "```", f"V2: {f.before}", f"V3: {f.after}", "```", ""]
    out += ["## Upscalers", "", "| V2 `upscaler_1` / `upscaler_2` | V3 `model_name` | same result? |",
            "|---|---|---|"]
    for name, u in m.upscalers.upscalers.items():
        target = f"`{u.v3_model}`" if u.v3_model else f"none: {u.note}"
        out.append(f"| `{name}` | {target} | {'yes' if u.exact else 'no: ' + u.note} |")
    out += ["", f"A null `upscaler_1` meant `{m.upscalers.default}`.", "",
            "## What V3 lacks, and what to do instead", ""]
    for unit in REGISTRY:
        fields = ", ".join(f"`{name}`" for name in unit.fields)
        out += [f"### {type(unit).__name__} ({fields})", "", unit.summary(), "", f"In V3: {unit.v3}.", ""]
    by_code: dict[int, list[str]] = defaultdict(list)
    for reason, code in m.errors.reasons.items():
        by_code[int(code)].append(f"`{reason}`")
    out += ["", "## V2 codes and the V3 errors behind them", "", "| V2 `code` | V3 `reason` |", "|---|---|"]
    out += [f"| {code} | {', '.join(reasons)} |" for code, reasons in sorted(by_code.items())]
    return "\n".join(out) + "\n"


def feature_table() -> str:
    """The README's table of V2 features V3 lacks (between its `features` markers), from the registry."""
    out = ["| V2 feature (unit) | field(s) | what V2 did | policy setting (default) | emulate | approximate | strict |",
           "|---|---|---|---|---|---|---|"]
    for unit in REGISTRY:
        fields = ", ".join(f"`{name}`" for name in unit.fields)
        setting = f"`UPSCALE_PROXY_POLICY_{unit.name.upper()}` (`{unit.default}`)"
        effects = [unit.effects.get(policy, "not offered") for policy in ("emulate", "approximate", "strict")]
        out.append(f"| `{type(unit).__name__}` | {fields} | {unit.summary()} | {setting} | {' | '.join(effects)} |")
    return "\n".join(out) + "\n"
