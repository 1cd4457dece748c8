"""A validated V2 body plus the probed image header -> a Plan (spec section 7).

The Plan says what V2 (AUTOMATIC1111's "extras") would have done and how the proxy gets there:
either one V3 job whose result is the answer (the **direct** path), or V3 jobs plus local steps
(the **composed** path): RGB input, per upscaler a chain of native 4x V3 passes or a local filter,
a LANCZOS resize to the exact size, a centre crop, a blend of two upscalers.

What V3 can't do is decided per feature by a policy: `emulate` (do it locally, exact), `approximate`
(the nearest single V3 request, plus a warning), `strict` (refuse with code 10 naming the field).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from proxy.errors import V2Code, V2Error
from proxy.mappings import Mappings, Upscaler
from proxy.v2.image import ImageInfo
from proxy.v2.models import V2UpscaleOptions

Policy = Literal["emulate", "approximate", "strict"]

MAX_OUTPUT_SIDE = 2048  # V2's documented limit, both modes
V3_MIN_FACTOR, V3_MAX_FACTOR = 1.0, 4.0  # V3 takes factors in (1, 4]
V3_NATIVE = 4  # the models' native factor: what one pass does, as in V2
V3_MAX_INPUT_SIDE = 2048
MAX_PASSES = 3
MAX_PIXELS = 8192 * 8192  # any image the proxy decodes or makes on the way (4 x 2048 per side)
V3_URL_TTL = 3600
DEFAULT_FACTOR = 2.0  # what the legacy SDKs send when the caller sets none


@dataclass(frozen=True, slots=True)
class Policies:
    """One policy per V2 feature V3 lacks. See the README's feature table for what each means."""

    scale_to: Policy = "emulate"  # resize_mode 1: an exact target size
    crop: Policy = "emulate"  # upscaling_crop
    factor: Policy = "emulate"  # upscaling_resize (or the scale-to factor) outside (1, 4]
    upscaler_2: Policy = "emulate"  # blending a second upscaler in
    local_upscaler: Policy = "emulate"  # Lanczos, Nearest, None
    model: Policy = "approximate"  # an upscaler whose V3 model is not the same weights
    alpha: Policy = "emulate"  # an input with transparency, which V2 dropped
    img_expire_ttl: Policy = "emulate"  # keeping the image longer than V3's 3600 s
    face: Policy = "approximate"  # GFPGAN / CodeFormer: no V3 successor, no local model: skipped


@dataclass(frozen=True, slots=True)
class V3Job:
    model: str
    scale_factor: float


@dataclass(frozen=True, slots=True)
class Branch:
    """One upscaler's work on the original input: `passes` native 4x V3 jobs, or a local filter."""

    upscaler: str
    model: str | None = None  # V3 model, when passes > 0 or it is the direct job
    filter: Literal["LANCZOS", "NEAREST"] | None = None  # a local upscaler
    passes: int = 0


@dataclass(frozen=True, slots=True)
class FaceStep:
    """A face-restoration step after the upscale (GFPGAN, then CodeFormer), as V2 ran them."""

    model: Literal["gfpgan", "codeformer"]
    visibility: float
    weight: float | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    input_size: tuple[int, int]
    scaled: tuple[int, int]  # (int(W0*s), int(H0*s)): what each branch is resized to
    output: tuple[int, int]
    branches: tuple[Branch, ...] = ()  # empty: upscaler None, the input as it is (in RGB)
    crop: tuple[int, int] | None = None  # paste centred on a black canvas of this size
    blend: float = 0.0  # weight of branches[1] in Image.blend
    direct: V3Job | None = None  # the one V3 job that answers on the direct path
    rgb_input: bool = False  # the input has transparency: V3 gets it converted to RGB, as V2 did
    faces: tuple[FaceStep, ...] = ()  # only when a local face restorer is available
    warnings: tuple[str, ...] = field(default=())
    # the features V3 lacks that this request uses (Policies' names), and what was done about each
    decisions: tuple[tuple[str, str], ...] = ()

    @property
    def warn(self) -> str:
        """V2's `data.warn`: one human-readable string, empty when there is nothing to say."""
        return "; ".join(self.warnings)

    @property
    def v3_passes(self) -> int:
        return sum(b.passes for b in self.branches)

    def to_doc(self) -> dict:
        """A JSON-ready dict, for the plan store."""
        return asdict(self)

    @classmethod
    def from_doc(cls, doc: dict) -> Plan:
        def pair(value: list | None) -> tuple[int, int] | None:
            return (value[0], value[1]) if value else None

        return cls(
            input_size=pair(doc["input_size"]), scaled=pair(doc["scaled"]), output=pair(doc["output"]),
            branches=tuple(Branch(**b) for b in doc["branches"]), crop=pair(doc["crop"]),
            blend=doc["blend"], direct=V3Job(**doc["direct"]) if doc["direct"] else None,
            rgb_input=doc["rgb_input"], faces=tuple(FaceStep(**f) for f in doc["faces"]),
            warnings=tuple(doc["warnings"]), decisions=tuple(tuple(d) for d in doc["decisions"]),
        )


def _refuse(field_name: str, what: str) -> V2Error:
    return V2Error(V2Code.NOT_SUPPORT, f"{field_name}: {what} is refused by this proxy's strict policy")


def _lookup(mappings: Mappings, field_name: str, name: str) -> Upscaler:
    upscaler = mappings.upscalers.upscalers.get(name)
    if upscaler is None:
        raise V2Error(V2Code.MODEL_NOT_EXIST, f"{field_name}: unknown upscaler {name!r}")
    return upscaler


def _passes(size: tuple[int, int], target: tuple[int, int]) -> int:
    """Native 4x passes until both sides reach the target, at most 3 (spec section 7)."""
    (w, h), n = size, 0
    while n < MAX_PASSES and (w < target[0] or h < target[1]):
        w, h, n = w * V3_NATIVE, h * V3_NATIVE, n + 1
    return n


class _Planner:
    """The decisions for one request; `plan()` returns the Plan or raises a V2Error."""

    def __init__(self, opts: V2UpscaleOptions, image: ImageInfo, mappings: Mappings, policies: Policies,
                 faces_available: bool):
        self.opts, self.image, self.mappings, self.policies = opts, image, mappings, policies
        self.faces_available = faces_available
        self.faces: list[FaceStep] = []
        self.warnings: list[str] = []
        self.decisions: dict[str, str] = {}  # feature -> what was done: emulate, approximate, skip
        self.compose = False

    def decide(self, feature: str, field_name: str, what: str, approximation: str) -> bool:
        """True to emulate; False when approximated (with a warning); raises under strict."""
        policy = getattr(self.policies, feature)
        if policy == "strict":
            raise _refuse(field_name, what)
        self.decisions[feature] = policy
        if policy == "approximate":
            self.warnings.append(f"{field_name}: {what} approximated: {approximation}")
            return False
        self.compose = True
        return True

    def model_warning(self, field_name: str, name: str, upscaler: Upscaler) -> None:
        if upscaler.v3_model and not upscaler.exact:
            if self.policies.model == "strict":
                raise V2Error(V2Code.MODEL_NOT_EXIST,
                              f"{field_name}: {name!r} has no same-weights V3 model (strict policy)")
            self.decisions["model"] = "approximate"
            self.warnings.append(f"{field_name} {name!r} runs as V3 model {upscaler.v3_model} ({upscaler.note})")

    def plan(self) -> Plan:
        opts, p = self.opts, self.policies
        w0, h0 = self.image.width, self.image.height
        name1 = opts.upscaler_1 if opts.upscaler_1 is not None else self.mappings.upscalers.default
        up1 = _lookup(self.mappings, "upscaler_1", name1)
        name2 = opts.upscaler_2 if opts.upscaler_2 and opts.upscaler_2 != "None" else None
        up2 = _lookup(self.mappings, "upscaler_2", name2) if name2 and opts.extras_upscaler_2_visibility else None
        if up1.local == "none":  # V2 skipped the whole upscale step, crop and blend included
            return self._identity(name1)

        # geometry, as AUTOMATIC1111 computed it
        crop = None
        if opts.resize_mode == 1:
            w, h = opts.upscaling_resize_w, opts.upscaling_resize_h
            if w is None or h is None:
                missing = "upscaling_resize_w" if w is None else "upscaling_resize_h"
                raise V2Error(V2Code.INVALID_JSON, f"{missing}: required when resize_mode is 1")
            factor = max(w / w0, h / h0)
            crop = (w, h) if opts.upscaling_crop else None
        else:
            factor = DEFAULT_FACTOR if opts.upscaling_resize is None else opts.upscaling_resize
        scaled = (int(w0 * factor), int(h0 * factor))
        output = crop or scaled
        if max(output) > MAX_OUTPUT_SIDE:
            raise V2Error(V2Code.PARAM_RANGE_OUT_OF_LIMIT,
                          f"output would be {output[0]}x{output[1]}, over the {MAX_OUTPUT_SIDE} px V2 allows per side")
        if scaled[0] * scaled[1] > MAX_PIXELS:
            raise V2Error(V2Code.PARAM_RANGE_OUT_OF_LIMIT,
                          f"the image would be scaled to {scaled[0]}x{scaled[1]} before the crop, too large")

        # what V3 lacks, feature by feature
        if opts.resize_mode == 1 and not self.decide(
                "scale_to", "resize_mode", "1 (scale to an exact size)", f"scaled by {factor:g} instead"):
            crop = None
        if crop and not self.decide("crop", "upscaling_crop", "a centre crop", "the image is not cropped"):
            crop = None
        if up2 and not self.decide("upscaler_2", "upscaler_2", f"blending {name2!r} in", "upscaler_2 is ignored"):
            up2 = None
        named = up1  # the upscaler the client asked for, for the model warning
        if up1.local and not self.decide("local_upscaler", "upscaler_1", f"{name1!r} (a local resize)",
                                         f"V3 model {self._default().v3_model} runs instead"):
            up1, named = self._default(), None
        direct_factor = factor
        if up1.v3_model and factor <= V3_MIN_FACTOR:  # no V3 job can stand in: a local resize is exact
            if p.factor == "strict":
                raise _refuse("upscaling_resize", f"a factor of {factor:g}")
            self.compose, self.decisions["factor"] = True, "emulate"
        elif up1.v3_model and factor > V3_MAX_FACTOR and not self.decide(
                "factor", "upscaling_resize", f"a factor of {factor:g}", f"V3 upscales by {V3_MAX_FACTOR:g}"):
            direct_factor = V3_MAX_FACTOR
        if self.image.has_alpha and p.alpha != "emulate":
            self.decide("alpha", "image", "an image with transparency", "V3 sees the alpha channel")
        ttl = opts.img_expire_ttl or 0
        if ttl > V3_URL_TTL and not self.compose:
            self.decide("img_expire_ttl", "img_expire_ttl", f"{ttl} s", f"V3 image URLs expire after {V3_URL_TTL} s")
        self._faces()
        if named:
            self.model_warning("upscaler_1", name1, named)
        if up2:
            self.model_warning("upscaler_2", name2, up2)

        rgb_input = self.image.has_alpha and p.alpha == "emulate"
        if rgb_input:
            self.decisions["alpha"] = "emulate"
        output = crop or scaled if self.compose else (int(w0 * direct_factor), int(h0 * direct_factor))
        if max(output) > MAX_OUTPUT_SIDE:  # an approximation dropped the crop that kept it small
            raise V2Error(V2Code.PARAM_RANGE_OUT_OF_LIMIT,
                          f"output would be {output[0]}x{output[1]} without the crop, over {MAX_OUTPUT_SIDE} px")
        if not self.compose:
            return Plan((w0, h0), scaled, output, branches=(Branch(name1, model=up1.v3_model),),
                        direct=V3Job(str(up1.v3_model), direct_factor), rgb_input=rgb_input,
                        warnings=tuple(self.warnings), decisions=tuple(self.decisions.items()))
        branches = [self._branch(name1, up1, (w0, h0), scaled)]
        if up2:
            branches.append(self._branch(str(name2), up2, (w0, h0), scaled))
        return Plan((w0, h0), scaled, output, branches=tuple(branches), crop=crop,
                    blend=float(opts.extras_upscaler_2_visibility or 0) if up2 else 0.0,
                    rgb_input=rgb_input, faces=tuple(self.faces), warnings=tuple(self.warnings),
                    decisions=tuple(self.decisions.items()))

    def _branch(self, name: str, upscaler: Upscaler, size: tuple[int, int], scaled: tuple[int, int]) -> Branch:
        if upscaler.local:
            return Branch(name, filter=upscaler.local)
        passes = _passes(size, scaled)
        largest_input = max(size) * V3_NATIVE ** max(passes - 1, 0)
        if largest_input > V3_MAX_INPUT_SIDE:
            raise V2Error(V2Code.PARAM_RANGE_OUT_OF_LIMIT,
                          f"upscaling_resize: {passes} passes of {name!r} would send V3 an image over "
                          f"{V3_MAX_INPUT_SIDE} px per side")
        return Branch(name, model=upscaler.v3_model, passes=passes)

    def _identity(self, name: str) -> Plan:
        if self.policies.local_upscaler == "strict":
            raise _refuse("upscaler_1", f"{name!r} (no upscale)")
        self.decisions["local_upscaler"] = "emulate"
        self._faces()
        size = (self.image.width, self.image.height)
        return Plan(size, size, size, faces=tuple(self.faces), warnings=tuple(self.warnings),
                    decisions=tuple(self.decisions.items()))

    def _faces(self) -> None:
        """GFPGAN then CodeFormer: restored locally where a restorer is available, else skipped."""
        for model in ("gfpgan", "codeformer"):
            visibility = getattr(self.opts, f"{model}_visibility")
            if not visibility:
                continue
            if self.policies.face == "strict":
                raise _refuse(f"{model}_visibility", "face restoration (no V3 successor)")
            if self.policies.face == "emulate" and self.faces_available:
                weight = self.opts.codeformer_weight if model == "codeformer" else None
                self.faces.append(FaceStep(model, visibility, weight))
                self.compose, self.decisions["face"] = True, "emulate"
            else:
                self.decisions["face"] = "skip"
                self.warnings.append(f"{model}_visibility ignored: face restoration has no V3 successor")

    def _default(self) -> Upscaler:
        table = self.mappings.upscalers
        return table.upscalers[table.default]


def plan_upscale(opts: V2UpscaleOptions, image: ImageInfo, mappings: Mappings,
                 policies: Policies = Policies(), faces_available: bool = False) -> Plan:
    """The Plan for one V2 upscale, or a V2Error (code 1, 2, 6 or 10) naming the field.

    `faces_available`: a local face restorer is plugged in (none is today, see compose.faces).
    """
    return _Planner(opts, image, mappings, policies, faces_available).plan()
