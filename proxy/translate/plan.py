"""A validated V2 body plus the probed image header -> a Plan: the V3 jobs and the warnings.

This covers the direct path (one V3 job, nothing to do locally). Bodies that need local work
(exact sizes, crops, factors outside (1, 4], a second upscaler, the non-AI upscalers) are refused
with code 10 naming the field, until the composed path exists.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.errors import V2Code, V2Error
from proxy.mappings import Mappings
from proxy.v2.image import ImageInfo
from proxy.v2.models import V2UpscaleOptions

MAX_OUTPUT_SIDE = 2048  # V2's documented limit, both modes
V3_MIN_FACTOR, V3_MAX_FACTOR = 1.0, 4.0  # V3 takes factors in (1, 4]
V3_URL_TTL = 3600
DEFAULT_FACTOR = 2.0  # what the legacy SDKs send when the caller sets none


@dataclass(frozen=True, slots=True)
class V3Job:
    model: str
    scale_factor: float


@dataclass(frozen=True, slots=True)
class Plan:
    jobs: tuple[V3Job, ...]
    target: tuple[int, int]
    warnings: tuple[str, ...] = ()

    @property
    def warn(self) -> str:
        """V2's `data.warn`: one human-readable string, empty when there is nothing to say."""
        return "; ".join(self.warnings)


def _not_yet(field: str, why: str) -> V2Error:
    return V2Error(V2Code.NOT_SUPPORT, f"{field}: {why} needs local image work, not supported yet")


def _target_size(opts: V2UpscaleOptions, image: ImageInfo) -> tuple[float, tuple[int, int]]:
    """(factor, output size) as AUTOMATIC1111 computed them (spec section 7)."""
    if opts.resize_mode == 1:
        w, h = opts.upscaling_resize_w, opts.upscaling_resize_h
        if w is None or h is None:
            missing = "upscaling_resize_w" if w is None else "upscaling_resize_h"
            raise V2Error(V2Code.INVALID_JSON, f"{missing}: required when resize_mode is 1")
        factor = max(w / image.width, h / image.height)
        scaled = (int(image.width * factor), int(image.height * factor))
        return factor, (w, h) if opts.upscaling_crop else scaled
    factor = DEFAULT_FACTOR if opts.upscaling_resize is None else opts.upscaling_resize
    return factor, (int(image.width * factor), int(image.height * factor))


def plan_upscale(opts: V2UpscaleOptions, image: ImageInfo, mappings: Mappings) -> Plan:
    """The Plan for one V2 upscale, or a V2Error (code 2, 6 or 10) naming the field."""
    table = mappings.upscalers
    name = opts.upscaler_1 if opts.upscaler_1 is not None else table.default
    upscaler = table.upscalers.get(name)
    if upscaler is None:
        raise V2Error(V2Code.MODEL_NOT_EXIST, f"upscaler_1: unknown upscaler {name!r}")
    blend = bool(opts.upscaler_2 and opts.upscaler_2 != "None" and opts.extras_upscaler_2_visibility)
    if blend and opts.upscaler_2 not in table.upscalers:
        raise V2Error(V2Code.MODEL_NOT_EXIST, f"upscaler_2: unknown upscaler {opts.upscaler_2!r}")

    factor, target = _target_size(opts, image)
    if max(target) > MAX_OUTPUT_SIDE:
        raise V2Error(
            V2Code.PARAM_RANGE_OUT_OF_LIMIT,
            f"output would be {target[0]}x{target[1]}, over the {MAX_OUTPUT_SIDE} px V2 allows per side",
        )

    if opts.resize_mode == 1:
        raise _not_yet("resize_mode", "1 (scale to upscaling_resize_w x upscaling_resize_h)")
    if upscaler.v3_model is None:
        raise _not_yet("upscaler_1", f"{name!r} (a local resize, no V3 model)")
    if not V3_MIN_FACTOR < factor <= V3_MAX_FACTOR:
        raise _not_yet("upscaling_resize", f"{factor:g}, outside the (1, 4] V3 accepts,")
    if blend:
        raise _not_yet("upscaler_2", f"blending {opts.upscaler_2!r} in")

    warnings = []
    if not upscaler.exact:
        warnings.append(f"upscaler_1 {name!r} runs as V3 model {upscaler.v3_model} ({upscaler.note})")
    for face in ("gfpgan_visibility", "codeformer_visibility"):
        if getattr(opts, face):
            warnings.append(f"{face} ignored: face restoration has no V3 successor")
    if opts.img_expire_ttl and opts.img_expire_ttl > V3_URL_TTL:
        warnings.append(f"img_expire_ttl {opts.img_expire_ttl} s: V3 image URLs expire after {V3_URL_TTL} s")
    return Plan(jobs=(V3Job(upscaler.v3_model, factor),), target=target, warnings=tuple(warnings))
