"""A validated V2 body plus the probed image header -> a Plan, in three moves:

1. a `Draft` of what the request asks, with V2's own limits checked (code 6 whatever the policy);
2. each feature unit of the registry (`features.REGISTRY`, in its order) that the request uses
   applies its policy to the draft: emulate, approximate, or strict (a V2 error naming the field);
3. `Draft.plan()` turns the draft into steps, with the geometry of the chosen A1111 release line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from proxy.errors import V2Error
from proxy.mappings import Mappings
from proxy.translate.draft import Draft, geometry, lookup
from proxy.translate.features import REGISTRY, Policy
from proxy.translate.plan import Plan
from proxy.translate.profiles import A1111Profile
from proxy.v2.image import ImageInfo
from proxy.v2.models import V2UpscaleOptions


def plan_upscale(opts: V2UpscaleOptions, image: ImageInfo, mappings: Mappings, policies: Mapping[str, Policy],
                 profile: A1111Profile, faces_available: bool = False) -> Plan:
    """The Plan for one V2 upscale, or a V2Error (code 1, 2, 6 or 10) naming the field."""
    name = opts.upscaler_1 if opts.upscaler_1 is not None else mappings.upscalers.default
    first = lookup(mappings, "upscaler_1", name)
    draft = Draft(opts, image, mappings, profile, faces_available,
                  upscaler_1=None if first.upscaler.local == "none" else first)
    _check_v2_limits(draft)
    for unit in REGISTRY:
        if not unit.used_by(draft):
            continue
        policy = policies.get(unit.name, unit.default)
        if policy == "strict":
            raise V2Error(unit.refusal_code,
                          f"{unit.field(draft)}: {unit.what(draft)} is refused by this proxy's strict policy",
                          feature=unit.name)
        draft.decisions[unit.name] = getattr(unit, policy)(draft) or policy
    return draft.plan()


def _check_v2_limits(d: Draft) -> None:
    """What V2 itself refused, whatever the policies: an output over 2048 px a side, checked on the
    request as asked (the units decide later what is done of it)."""
    if d.upscaler_1 is None:
        return
    o = d.opts
    size = (o.upscaling_resize_w, o.upscaling_resize_h) if o.resize_mode == 1 else None
    as_asked = replace(d, scale_to=size, orient=d.profile.keep_rgba and d.image.orientation not in (0, 1))
    geometry(as_asked, size if o.upscaling_crop else None)


