"""AUTOMATIC1111 release lines: how each one sized, looped and coloured the extras upscale
(spec section 7.2). The operator names the line the provider ran (`UPSCALE_PROXY_A1111_PROFILE`);
the planner asks the profile for the target size and the passes, the composer for the colours.

Everything here is arithmetic on sizes, so the plan (and the translate preview) knows every
intermediate size before any pixel is touched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Size = tuple[int, int]
MAX_PASSES = 3  # A1111's `for _ in range(3)`

# When the size check may end the pass loop at s == 1 (v1.9.4 and v1.10 changed it)
StopAtOne = Literal["yes", "never", "after_first_pass"]


@dataclass(frozen=True, slots=True)
class A1111Profile:
    name: str
    releases: str
    round_to_8: bool  # v1.4+: the target is rounded down to a multiple of 8 (3539885f, 8c8c3617)
    check_before_pass: bool  # v1.7+: the size is checked before each pass (4a666381)
    stop_at_one: StopAtOne  # v1.9.4: never at s == 1 (9d4fdc45); v1.10: after one pass (964fc13a)
    keep_rgba: bool  # v1.9+: EXIF orientation applied, PNG transparency fixed, RGB and RGBA kept
    # v1.10 read the PNG info after the conversion to RGB, so a palette or grey colour key became
    # an RGB key on the result; before, only an RGB input's key was carried (others made A1111 fail)
    converted_colour_key: bool = False

    def target(self, size: Size, s: float) -> Size:
        """`dest` of `Upscaler.upscale`: what every upscaler's result is resized to."""
        w, h = size
        if self.round_to_8:
            return int((w * s) // 8 * 8), int((h * s) // 8 * 8)
        return int(w * s), int(h * s)

    def passes(self, size: Size, s: float, dest: Size, step: Callable[[Size], Size]) -> list[Size]:
        """The size after each pass the upscaler runs, as `Upscaler.upscale`'s loop ran them.

        `step` is one pass of the upscaler: 4x for a model, `int(side * s)` for Lanczos/Nearest.
        """
        sizes: list[Size] = []
        for i in range(MAX_PASSES):
            if self.check_before_pass and _reached(size, dest) and self._may_stop(i, s):
                break
            after = step(size)
            sizes.append(after)
            if after == size:  # a pass that changes nothing ends the loop
                break
            size = after
            if not self.check_before_pass and _reached(size, dest):
                break
        return sizes

    def _may_stop(self, i: int, s: float) -> bool:
        if s != 1 or self.stop_at_one == "yes":
            return True
        return self.stop_at_one == "after_first_pass" and i > 0


def _reached(size: Size, dest: Size) -> bool:
    return size[0] >= dest[0] and size[1] >= dest[1]


PROFILES: dict[str, A1111Profile] = {p.name: p for p in (
    A1111Profile("v1.3", "1.0.0 to 1.3.2", round_to_8=False, check_before_pass=False, stop_at_one="yes",
                 keep_rgba=False),
    A1111Profile("v1.6", "1.4.0 to 1.6.x", round_to_8=True, check_before_pass=False, stop_at_one="yes",
                 keep_rgba=False),
    A1111Profile("v1.8", "1.7.0 to 1.8.0", round_to_8=True, check_before_pass=True, stop_at_one="yes",
                 keep_rgba=False),
    # section 7.2 of the spec puts 1.9.3 here, but 9d4fdc45 is in the v1.9.3 tag: it loops as 1.9.4
    A1111Profile("v1.9", "1.9.0 to 1.9.2", round_to_8=True, check_before_pass=True, stop_at_one="yes",
                 keep_rgba=True),
    A1111Profile("v1.9.4", "1.9.3 and 1.9.4", round_to_8=True, check_before_pass=True, stop_at_one="never",
                 keep_rgba=True),
    A1111Profile("v1.10", "1.10.x", round_to_8=True, check_before_pass=True, stop_at_one="after_first_pass",
                 keep_rgba=True, converted_colour_key=True),
)}
ProfileName = Literal["v1.3", "v1.6", "v1.8", "v1.9", "v1.9.4", "v1.10"]
DEFAULT_PROFILE: ProfileName = "v1.3"
