"""The migration dashboard (DESIGN.md, "The operator's side"): server-rendered pages over the usage
store and, with a legacy V2, the migration (stages, shadow comparisons), their data as JSON and CSV,
and the admin API for client labels and stages, all behind the admin token.

    auth.py      the admin token: Bearer, the login form's session cookie, `?token=` once; audits refusals
    pages.py     /_proxy/dashboard (overview, clients, one client, features), login, logout, the assets,
                 the label and stage forms
    api.py       /_proxy/usage (JSON, CSV), /_proxy/usage/clients/{fingerprint}, the labels API;
                 /_proxy/migration, the stage API, the shadow comparisons' images
    templates/   Jinja2, autoescaped; one base with the nav bar and the period selector
    static/      vendored, no build step, no CDN: uPlot 1.6.32 (npm `uplot`, dist/uPlot.iife.min.js and
                 uPlot.min.css), simple.css 2.3.7 (npm `simpledotcss`, simple.min.css), each with its
                 LICENSE; dashboard.css and dashboard.js are ours

Every page, its JSON and its CSV read the same function of proxy/usage/view.py (and, for the
migration, of proxy/migration/view.py).
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web
from markupsafe import Markup, escape

from proxy.dashboard import auth
from proxy.settings import Settings
from proxy.translate.features import BY_NAME

TEMPLATES = Path(__file__).with_name("templates")


def setup(app: web.Application, settings: Settings) -> None:
    """The admin token and the templates (the routes are in proxy/app.py's setup_routes)."""
    auth.setup(app, settings)
    env = aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                               undefined=jinja2.StrictUndefined, default_helpers=False,
                               trim_blocks=True, lstrip_blocks=True)
    env.filters.update(when=_when, ago=_ago, day=_day, pct=_pct, num=_num, unit=_unit, ticks=_ticks, shape=_shape,
                       at=_at, db=_db, ssim=_ssim)


def _parse(iso: str) -> datetime | None:
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC) if iso else None


def _when(iso: str) -> str:
    t = _parse(iso)
    return t.strftime("%Y-%m-%d %H:%M UTC") if t else "never"


def _ago(iso: str, now: datetime) -> str:
    t = _parse(iso)
    if t is None:
        return "never"
    s = max(0, int((now - t).total_seconds()))
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if s >= size:
            return f"{s // size} {unit} ago"
    return f"{s} s ago"


def _day(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d")


def _at(epoch: float) -> str:
    """The migration store's times (epoch seconds), to the second: stage changes come in bursts."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if epoch else "never"


def _db(psnr: float | str | None) -> str:
    """A PSNR as the store keeps it: dB, "inf" for identical pixels, None with no two images."""
    if psnr is None:
        return "–"
    return "∞ dB" if psnr == "inf" or (isinstance(psnr, float) and math.isinf(psnr)) else f"{float(psnr):.1f} dB"


def _ssim(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _pct(share: float) -> str:
    return f"{share * 100:.0f} %"


def _num(n: float) -> str:
    return f"{n:,.0f}".replace(",", "\u202f")  # a narrow no-break space between thousands


def _unit(name: str) -> str:
    """A feature's unit, by its class name (CropToCentre), as the guide and the README name it."""
    unit = BY_NAME.get(name)
    return (unit if isinstance(unit, type) else type(unit)).__name__ if unit is not None else name


def _ticks(text: str) -> Markup:
    """The registry's docstrings mark fields `like this` (Markdown): escaped, then set as code."""
    return Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", str(escape(text))))


def _shape(shape: str) -> str:
    """A body shape (proxy/v2/translation.py shape_of) as a person reads it: the fields it sets,
    then the image it sent."""
    doc = json.loads(shape)
    fields = ", ".join(f"{k}={json.dumps(v)}" for k, v in doc["fields"].items() if k != "image" and v is not None)
    image = doc.get("image", {})
    return f"{fields or '(no field but the image)'}; image: {image.get('format', '?')} " \
           f"{image.get('width', '?')}x{image.get('height', '?')} {image.get('mode', '')}".rstrip()
