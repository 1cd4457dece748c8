"""The Draft: a V2 request as the feature units shape it, and how it becomes a Plan's steps with
the geometry of the chosen A1111 release line (`Draft.plan()`). One V3 job and nothing else is the
direct path; anything more is composed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from proxy.errors import V2Code, V2Error
from proxy.mappings import Mappings, Upscaler
from proxy.translate.plan import (
    MAX_OUTPUT_SIDE,
    V3_MAX_FACTOR,
    V3_MAX_INPUT_SIDE,
    V3_MIN_FACTOR,
    V3_NATIVE,
    V3_URL_TTL,
    Plan,
)
from proxy.translate.profiles import A1111Profile, Size
from proxy.translate.steps import (
    MAX_PIXELS,
    Blend,
    Branch,
    CropToCanvas,
    ReadInput,
    Resize,
    RestoreFaces,
    V3Job,
)
from proxy.v2.image import ImageInfo
from proxy.v2.models import V2UpscaleOptions

DEFAULT_FACTOR = 2.0  # what the legacy SDKs send when the caller sets none
_MAX_SIDE_BEFORE_CROP = 8 * MAX_OUTPUT_SIDE  # far past anything V2 could make: refused before any int()


def v3_output_size(size: Size, factor: float) -> Size:
    """The size V3 gives for `scale_factor` (the emulator's reading of the V3 docs: int(W*s))."""
    return int(size[0] * factor), int(size[1] * factor)


@dataclass
class Choice:
    """An upscaler the request names, and what runs it (mappings/upscalers.toml)."""

    field: Literal["upscaler_1", "upscaler_2"]
    name: str
    upscaler: Upscaler

    @property
    def is_model(self) -> bool:
        return self.upscaler.v3_model is not None


@dataclass
class Draft:
    """The request as the feature units shape it; `plan()` turns it into steps."""

    opts: V2UpscaleOptions
    image: ImageInfo
    mappings: Mappings
    profile: A1111Profile
    faces_available: bool
    upscaler_1: Choice | None  # None: upscaler_1 "None", V2 skipped the upscale entirely
    upscaler_2: Choice | None = None  # set when the second upscaler is blended in
    scale_to: Size | None = None  # resize_mode 1: the factor covers this size
    crop: Size | None = None
    native_passes: bool = False  # models run A1111's native 4x passes, not one V3 job at s
    factor_cap: float | None = None  # one V3 job at this factor instead, at the size it gives
    v3_pixels: bool = False
    orient: bool = False
    keep_images: bool = False
    faces: RestoreFaces | None = None
    warnings: list[str] = field(default_factory=list)
    decisions: dict[str, str] = field(default_factory=dict)

    @property
    def branches(self) -> list[Choice]:
        return [c for c in (self.upscaler_1, self.upscaler_2) if c]

    @property
    def size(self) -> Size:
        """The input size as the release saw it: EXIF orientations 5 to 8 swap the sides."""
        w, h = self.image.width, self.image.height
        return (h, w) if self.orient and self.image.orientation in (5, 6, 7, 8) else (w, h)

    @property
    def factor(self) -> float:
        if self.scale_to:
            (w, h), (w0, h0) = self.scale_to, self.size
            return max(w / w0, h / h0)  # cover, as A1111 computed it
        return DEFAULT_FACTOR if self.opts.upscaling_resize is None else self.opts.upscaling_resize

    @property
    def factor_in_v3_range(self) -> bool:
        return V3_MIN_FACTOR < self.factor <= V3_MAX_FACTOR

    def default_model(self) -> Choice:
        table = self.mappings.upscalers
        return Choice("upscaler_1", table.default, table.upscalers[table.default])

    def plan(self) -> Plan:
        return _build(self)


def lookup(mappings: Mappings, field_name: Literal["upscaler_1", "upscaler_2"], name: str) -> Choice:
    upscaler = mappings.upscalers.upscalers.get(name)
    if upscaler is None:
        raise V2Error(V2Code.MODEL_NOT_EXIST, f"{field_name}: unknown upscaler {name!r}")
    return Choice(field_name, name, upscaler)


def geometry(d: Draft, crop: Size | None) -> tuple[float, Size]:
    """(the factor, A1111's target size), or code 6 for an output V2 could not make."""
    (w0, h0), s = d.size, d.factor
    if not (math.isfinite(w0 * s) and math.isfinite(h0 * s)) or max(w0, h0) * s > _MAX_SIDE_BEFORE_CROP:
        raise V2Error(V2Code.PARAM_RANGE_OUT_OF_LIMIT,
                      f"a factor of {s:g} makes the image far larger than the {MAX_OUTPUT_SIDE} px V2 allows")
    dest = v3_output_size((w0, h0), d.factor_cap) if d.factor_cap else d.profile.target((w0, h0), s)
    if min(dest) < 1:
        raise V2Error(V2Code.PARAM_RANGE_OUT_OF_LIMIT,
                      f"a factor of {s:g} makes {w0}x{h0} round to {dest[0]}x{dest[1]}: "
                      f"A1111 {d.profile.name} could not upscale it")
    output = crop or dest
    if max(output) > MAX_OUTPUT_SIDE:
        dropped = " without the crop" if d.opts.upscaling_crop and d.opts.resize_mode == 1 and not crop else ""
        raise V2Error(V2Code.PARAM_RANGE_OUT_OF_LIMIT,
                      f"output would be {output[0]}x{output[1]}{dropped}, over the {MAX_OUTPUT_SIDE} px V2 "
                      "allows per side")
    if dest[0] * dest[1] > MAX_PIXELS:
        raise V2Error(V2Code.PARAM_RANGE_OUT_OF_LIMIT,
                      f"the image would be scaled to {dest[0]}x{dest[1]} before the crop, too large")
    return s, dest


def _build(d: Draft) -> Plan:
    image = d.image
    common = {
        "profile": d.profile.name, "input_size": d.size,
        "read": ReadInput(keep_rgba=d.profile.keep_rgba, exif_orientation=d.orient),
        "v3_input": "pixels" if d.v3_pixels else "as_sent", "faces": d.faces,
        "keep_colour_key": image.format == "PNG" and image.has_alpha and (
            image.mode == "RGB" or (d.profile.converted_colour_key and image.mode in ("P", "L"))),
        "ttl": d.opts.img_expire_ttl or V3_URL_TTL,
        "warnings": tuple(d.warnings), "decisions": dict(d.decisions),
    }
    if d.upscaler_1 is None:
        return Plan(output_size=d.size, **common)
    s, dest = geometry(d, d.crop)
    branches = tuple(_branch(d, choice, s, dest) for choice in d.branches)
    blend = Blend(visibility=d.opts.extras_upscaler_2_visibility or 0.0,
                  to_first_mode=d.profile.keep_rgba) if d.upscaler_2 else None
    only = branches[0]
    local_work = blend or d.faces or d.keep_images or common["keep_colour_key"] or only.steps
    if not local_work and len(only.v3_jobs) == 1:
        return Plan(output_size=dest, direct=only.v3_jobs[0], **common)
    return Plan(output_size=d.crop or dest, branches=branches, blend=blend, **common)


def _branch(d: Draft, choice: Choice, s: float, dest: Size) -> Branch:
    size, upscaler, jobs, steps = d.size, choice.upscaler, [], []
    if upscaler.local:  # Lanczos, Nearest: each pass a Pillow resize by s
        last = size
        for after in d.profile.passes(size, s, dest, lambda z: (int(z[0] * s), int(z[1] * s))):
            if after != last:
                steps.append(Resize(size=after, filter=upscaler.local))
            last = after
    elif d.factor_cap or (d.factor_in_v3_range and not d.native_passes):
        factor = d.factor_cap or s
        last = v3_output_size(size, factor)
        jobs.append(V3Job(model=str(upscaler.v3_model), scale_factor=factor, size_in=size, size_out=last))
    else:  # the model's native 4x passes, as A1111 ran them
        last = size
        for after in d.profile.passes(size, s, dest, lambda z: (z[0] * V3_NATIVE, z[1] * V3_NATIVE)):
            where = f"{choice.field}: pass {len(jobs) + 1} of {choice.name!r}"
            if max(last) > V3_MAX_INPUT_SIDE:
                raise V2Error(V2Code.PARAM_RANGE_OUT_OF_LIMIT, f"{where} would send V3 a {last[0]}x{last[1]} "
                              f"image, over the {V3_MAX_INPUT_SIDE} px V3 accepts per side")
            if after[0] * after[1] > MAX_PIXELS:
                raise V2Error(V2Code.PARAM_RANGE_OUT_OF_LIMIT,
                              f"{where} would make a {after[0]}x{after[1]} image, too large to compose")
            jobs.append(V3Job(model=str(upscaler.v3_model), scale_factor=V3_NATIVE, size_in=last, size_out=after))
            last = after
    if last != dest:
        steps.append(Resize(size=dest))
    if d.crop:
        steps.append(CropToCanvas(size=d.crop))
    return Branch(field=choice.field, upscaler=choice.name, v3_jobs=tuple(jobs), steps=tuple(steps))
