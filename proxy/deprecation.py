"""The end of V2, told in-band: Deprecation, Sunset and Link headers on every V2 response, and
brownouts that refuse V2 calls in configured windows (code 10, never HTTP 429)."""

from __future__ import annotations

import random
from collections.abc import Iterable
from datetime import UTC, datetime
from email.utils import format_datetime

from multidict import CIMultiDict

from proxy.errors import V2Code, V2Error
from proxy.settings import Brownout, Settings

# each V2 endpoint's V3 successor
SUCCESSORS = {"upscale": "/v3/async/upscale", "progress": "/v3/async/task-result"}


def http_date(moment: datetime) -> str:
    """IMF-fixdate (RFC 9110), as RFC 8594 wants for Sunset."""
    return format_datetime(moment.astimezone(UTC), usegmt=True)


class Deprecation:
    """The headers of every V2 response (RFC 9745 Deprecation, RFC 8594 Sunset, RFC 8288 Link)."""

    def __init__(self, settings: Settings) -> None:
        common = [("Deprecation", f"@{int(settings.deprecation_date.timestamp())}")]
        if settings.sunset_date:
            common.append(("Sunset", http_date(settings.sunset_date)))
        common.append(("Link", f'<{settings.deprecation_link}>; rel="deprecation"; type="text/markdown"'))
        base = (settings.successor_url or "").rstrip("/")
        self._headers = {
            endpoint: [*common, ("Link", f'<{base}{path}>; rel="successor-version"')]
            for endpoint, path in SUCCESSORS.items()
        }
        self._common = common

    def apply(self, headers: CIMultiDict, endpoint: str | None) -> None:
        headers.extend(self._headers.get(endpoint or "", self._common))


class BrownoutRefusal(V2Error):
    """A V2 call refused because a brownout window is on."""


class Brownouts:
    """Refuses V2 calls inside configured windows: all of them, or a fraction, but for allowed
    clients. The refusal names the sunset date and the guide, so it explains itself."""

    def __init__(self, windows: Iterable[Brownout], sunset: datetime | None, guide: str,
                 rng: random.Random | None = None) -> None:
        self._windows = tuple(windows)
        self._sunset = sunset
        self._guide = guide
        self._random = (rng or random.Random()).random

    def check(self, fingerprint: str | None, now: datetime | None = None) -> None:
        """Raise BrownoutRefusal if a window refuses this call; free when no window is configured."""
        if not self._windows:
            return
        now = now or datetime.now(UTC)
        for window in self._windows:
            if window.start <= now < window.end and fingerprint not in window.allow:
                if window.fraction >= 1 or self._random() < window.fraction:
                    raise BrownoutRefusal(V2Code.NOT_SUPPORT, self._message(window))

    def _message(self, window: Brownout) -> str:
        end = window.end.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
        stop = (f"V2 stops for good on {self._sunset.astimezone(UTC):%Y-%m-%d}"
                if self._sunset else "V2 is deprecated")
        return f"V2 brownout until {end}: {stop}. Move to V3; migration guide: {self._guide}"
