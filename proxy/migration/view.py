"""What the dashboard's migration views and `GET /_proxy/migration` read: one function per view,
over the router (the rules as they hold now) and what the migration store keeps (the last stage
changes and shadow comparisons), so that a page and its JSON can never disagree.

    migration(router, store, seen)   every known client's rule, the file's default, V2 gone or not,
                                     the shadow match rate and noise floor, the last changes and
                                     comparisons (the overview's panel)
    client(router, store, name)      one client: its rule and where it came from, its comparisons
                                     (with their images' URLs) and its stage changes
    stage_of(router)                 a client's rule for the usage rows (the clients table's column)

A comparison's `psnr` is a number of dB, or "inf" for identical pixels, as the store keeps it.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from collections.abc import Callable, Iterable

from proxy.migration.router import Router
from proxy.migration.stages import STAGES
from proxy.migration.store import MigrationStore

EVENTS_SHOWN = 50  # stage changes in a view, newest first
COMPARISONS_SHOWN = 100  # shadow comparisons in a view, newest first
OUTCOMES = ("match", "explained", "mismatch", "error")
IMAGES = ("v2", "v3", "heat")  # V2's image, the translation's, the heat map of their difference
IMAGE_URL = "/_proxy/dashboard/shadow/{id}/{image}.png"
_FINGERPRINT = re.compile(r"[0-9a-f]{16}")


def has_stage(name: str) -> bool:
    """Only a key's fingerprint has a stage: calls without a key ("unidentified") or past the
    usage store's bound ("other") are no one client."""
    return bool(_FINGERPRINT.fullmatch(name))


def stage_of(router: Router) -> Callable[[str], dict | None]:
    """A client's rule as the usage rows carry it (None: no stage)."""
    return lambda name: router.rule(name).to_doc() if has_stage(name) else None


def known_clients(router: Router, seen: Iterable[str]) -> list[str]:
    """The clients the usage store has seen, and those the rules name (the file's, the changes)."""
    names = {name for name in seen if has_stage(name)} | set(router.rules.by_fingerprint) | set(router.changes)
    names |= {fp for fp, label in router.labels.items() if label in router.rules.by_label and has_stage(fp)}
    return sorted(names)


def shadow_summary(comparisons: list[dict]) -> dict:
    """The comparisons by outcome, and the match rate: those that matched or were explained (neither
    counts against a client), of those judged (an error judges nothing)."""
    counts = Counter(c.get("outcome", "error") for c in comparisons)
    judged = counts["match"] + counts["explained"] + counts["mismatch"]
    return {"compared": len(comparisons), "by_outcome": {o: counts.get(o, 0) for o in OUTCOMES},
            "match_rate": round((counts["match"] + counts["explained"]) / judged, 4) if judged else None}


def _db(psnr: float | str) -> float:
    return math.inf if psnr == "inf" else float(psnr)


def noise_floor(comparisons: list[dict]) -> dict:
    """V2 against itself (the comparisons that measured it): the median PSNR and SSIM two images of
    the same V2 are apart, which a threshold is read against."""
    samples = [c["noise"] for c in comparisons if c.get("noise")]
    psnrs = [_db(s["psnr"]) for s in samples if s.get("psnr") is not None]
    ssims = [float(s["ssim"]) for s in samples if s.get("ssim") is not None]
    psnr = statistics.median(psnrs) if psnrs else None
    return {"samples": len(samples),
            "psnr": None if psnr is None else ("inf" if math.isinf(psnr) else round(psnr, 2)),
            "ssim": round(statistics.median(ssims), 5) if ssims else None,
            "by_outcome": dict(Counter(s.get("outcome", "error") for s in samples))}


def with_images(comparison: dict) -> dict:
    """A comparison with the URLs of its images, when it kept them; a heat map only where the sizes
    agree (compare.py makes none otherwise)."""
    if not comparison.get("images"):
        return {**comparison, "image_urls": {}}
    sizes = comparison.get("sizes")
    kept = IMAGES if not sizes or sizes[0] == sizes[1] else IMAGES[:2]
    return {**comparison, "image_urls": {name: IMAGE_URL.format(id=comparison["id"], image=name) for name in kept}}


def _rule(router: Router, name: str) -> dict:
    return {"client": name, "label": router.labels.get(name, ""), **router.rule(name).to_doc()}


async def migration(router: Router, store: MigrationStore, seen: Iterable[str], *,
                    events: int = EVENTS_SHOWN, comparisons: int = COMPARISONS_SHOWN) -> dict:
    """The whole migration: every known client's rule, and what the store keeps of it."""
    kept, changes = await store.comparisons(), (await store.events())[:events]
    clients = [_rule(router, name) for name in known_clients(router, seen)]
    by_stage = Counter(c["stage"] for c in clients)
    return {
        "v2_gone": router.gone, "default": router.rules.default.to_doc(), "canary_hash": router.rules.canary_hash,
        "clients": clients, "clients_by_stage": {stage: by_stage.get(stage, 0) for stage in STAGES},
        "shadow": shadow_summary(kept), "noise_floor": noise_floor(kept),
        "events": [{**e, "label": router.labels.get(e.get("fingerprint", ""), "")} for e in changes],
        "comparisons": [with_images(c) for c in kept[:comparisons]],
    }


async def client(router: Router, store: MigrationStore, name: str, *,
                 events: int = EVENTS_SHOWN, comparisons: int = COMPARISONS_SHOWN) -> dict:
    """One client: its rule now, the file's (what clearing a change goes back to), its shadow
    comparisons and its stage changes (V2's removal included: it moved everyone)."""
    mine = [c for c in await store.comparisons() if c.get("fingerprint") == name]
    changes = [e for e in await store.events() if e.get("fingerprint") in (name, "*")]
    return {
        **_rule(router, name), "v2_gone": router.gone,
        "file_rule": router.rules.rule_for(name, router.labels.get(name), {}).to_doc(),
        "shadow": shadow_summary(mine), "noise_floor": noise_floor(mine),
        "comparisons": [with_images(c) for c in mine[:comparisons]], "events": changes[:events],
    }
