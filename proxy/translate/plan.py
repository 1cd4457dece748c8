"""The Plan: what the proxy does for one V2 upscale, decided before anything is sent.

Either one V3 job whose result is the answer (the **direct** path), or V3 job chains and local
steps whose composition is the answer (the **composed** path). Every step is a model from
`steps.py` that both describes itself (the translate preview) and does its work (the composer),
so the two cannot drift. The planner (`planner.py`) builds it; the composer only follows it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from proxy.translate.steps import Blend, Branch, ReadInput, RestoreFaces, Size, V3Job

MAX_OUTPUT_SIDE = 2048  # V2's documented limit, both modes
V3_NATIVE = 4  # the models' native factor: what one pass does, as in V2
V3_MIN_FACTOR, V3_MAX_FACTOR = 1.0, 4.0  # V3 takes factors in (1, 4]
V3_MAX_INPUT_SIDE = 2048
V3_URL_TTL = 3600  # seconds V3's image URLs live


class Plan(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    profile: str  # the A1111 release line followed
    input_size: Size  # as the release saw it (after EXIF orientation, where it applied it)
    output_size: Size
    read: ReadInput
    # "pixels": V3 gets the input re-encoded as an RGB PNG without transparency (and turned
    # upright where the release did that); "as_sent": the client's own bytes
    v3_input: Literal["as_sent", "pixels"] = "as_sent"
    direct: V3Job | None = None
    branches: tuple[Branch, ...] = ()  # empty on the direct path, and for upscaler None
    blend: Blend | None = None
    faces: RestoreFaces | None = None
    keep_colour_key: bool = False  # the input's PNG colour key is written on the result, as V2 did
    ttl: int = V3_URL_TTL  # seconds the result stays downloadable
    warnings: tuple[str, ...] = ()
    # each feature V3 lacks that this request uses -> what was done: emulate, approximate, skip
    decisions: dict[str, str] = {}

    @property
    def path(self) -> Literal["direct", "composed"]:
        return "direct" if self.direct else "composed"

    @property
    def warn(self) -> str:
        """V2's `data.warn`: one human-readable string, empty when there is nothing to say."""
        return "; ".join(self.warnings)

    @property
    def v3_jobs(self) -> int:
        return 1 if self.direct else sum(len(b.v3_jobs) for b in self.branches)

    def describe(self) -> list[str]:
        """What happens, in order, as a client team would read it."""
        lines = [self.read.describe()]
        if self.v3_input == "pixels":
            lines.append("V3 gets those pixels as an RGB PNG, without alpha or a transparency key")
        if self.direct:
            lines.append(f"{self.direct.describe()}: its image is the answer")
        elif not self.branches:
            lines.append("no upscale (upscaler_1 None): the input as read, as V2 did")
        for branch in self.branches:
            lines += branch.describe()
        if self.blend:
            lines.append(self.blend.describe())
        if self.faces:
            lines.append(self.faces.describe())
        if self.keep_colour_key:
            lines.append("the input's transparency colour key is written on the PNG, as V2 did")
        return lines
