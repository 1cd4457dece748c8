"""Every V2 feature that V3 lacks, one unit each, in the order the planner consults them.

A unit declares its V2 field(s), its policy (`UPSCALE_PROXY_POLICY_<NAME>`), the policy it
defaults to and the ones it allows, what a client team does in V3 instead, and what the proxy
does under each policy. Its docstring is written for client teams: the migration guide, the
usage report and the README's feature table are generated from this registry, so none of them
can drift from what the planner does.

To add a feature: write a unit below, put it in `REGISTRY` where it belongs in the order, and
regenerate the README table (`upscale-v2-proxy guide --features`); a test checks the table.

Policies: `emulate` does the work locally, exactly as V2 did; `approximate` takes the nearest V3
request and says so in `warn`; `strict` refuses with a V2 error naming the field.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar, Literal

from proxy.errors import V2Code
from proxy.translate.draft import Draft, lookup
from proxy.translate.plan import V3_MAX_FACTOR, V3_URL_TTL
from proxy.translate.steps import RestoreFaces as RestoreFacesStep

Policy = Literal["emulate", "approximate", "strict"]
# change: V3 has an equivalent, the client changes its request; lacking: V3 has nothing like it;
# same: V3 does it its own way and the client need change nothing (the usage report leaves it out)
Verdict = Literal["change", "lacking", "same"]
ALL: tuple[Policy, ...] = ("emulate", "approximate", "strict")


class Feature:
    name: ClassVar[str]  # the policy's name
    fields: ClassVar[tuple[str, ...]]
    default: ClassVar[Policy] = "emulate"
    allowed: ClassVar[tuple[Policy, ...]] = ALL
    verdict: ClassVar[Verdict] = "lacking"
    v3: ClassVar[str]  # what a client team does in V3 instead
    effects: ClassVar[dict[Policy, str]]  # what the proxy does under each allowed policy
    refusal_code: ClassVar[V2Code] = V2Code.NOT_SUPPORT

    def used_by(self, d: Draft) -> bool:
        raise NotImplementedError

    def what(self, d: Draft) -> str:
        """The thing refused, for the strict policy's message: "<field>: <what> is refused ..."."""
        raise NotImplementedError

    def field(self, d: Draft) -> str:
        """The V2 field a strict refusal names: the one of `fields` this request used."""
        return self.fields[0]

    def emulate(self, d: Draft) -> str | None:
        """Shape the draft to do it exactly; may return another decision to record."""
        return None

    def approximate(self, d: Draft) -> str | None:
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        """The docstring's first paragraph, on one line."""
        return " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())


def _approximated(d: Draft, field: str, what: str, instead: str) -> None:
    d.warnings.append(f"{field}: {what} approximated: {instead}")


class ApplyExifOrientation(Feature):
    """From A1111 1.9, an image with an EXIF orientation was turned upright before the upscale.
    V3 upscales the stored pixels as they are."""

    name = "orientation"
    fields = ("image",)
    v3 = "turn the image upright yourself (ImageOps.exif_transpose) before sending it"
    effects = {"emulate": "the input is turned upright locally; V3 gets the upright pixels",
               "approximate": "V3 gets the image as sent, not turned, with a `warn`",
               "strict": "code 10"}
    verdict = "change"

    def used_by(self, d: Draft) -> bool:
        return d.profile.keep_rgba and d.image.orientation not in (0, 1)

    def what(self, d: Draft) -> str:
        return f"an EXIF orientation of {d.image.orientation}"

    def emulate(self, d: Draft) -> None:
        d.orient = True
        d.v3_pixels = True

    def approximate(self, d: Draft) -> None:
        _approximated(d, "image", self.what(d), "upscaled as stored, not turned upright")


class ScaleToExactSize(Feature):
    """`resize_mode` 1 scaled to `upscaling_resize_w` x `upscaling_resize_h`: by the factor
    max(w / W, h / H), so that the image covers the size. V3 only scales by a factor."""

    name = "scale_to"
    fields = ("resize_mode", "upscaling_resize_w", "upscaling_resize_h")
    allowed = ("emulate", "strict")
    v3 = "no target size: scale by max(w/W, h/H) with scale_factor, then resize locally"
    effects = {"emulate": "the factor max(w/W, h/H) is computed here; the size is exact",
               "strict": "code 10"}

    def used_by(self, d: Draft) -> bool:
        return d.opts.resize_mode == 1 and d.upscaler_1 is not None

    def what(self, d: Draft) -> str:
        return "1 (scale to an exact size)"

    def emulate(self, d: Draft) -> None:
        d.scale_to = (d.opts.upscaling_resize_w, d.opts.upscaling_resize_h)


class CropToCentre(Feature):
    """`upscaling_crop` in mode 1: the scaled image pasted centred on a black w x h canvas, so the
    result is exactly the size asked for."""

    name = "crop"
    fields = ("upscaling_crop",)
    v3 = "no crop: crop the centre of the result locally"
    effects = {"emulate": "pasted centred on a black w x h canvas, locally",
               "approximate": "not cropped (the cover-scaled image), with a `warn`",
               "strict": "code 10"}

    def used_by(self, d: Draft) -> bool:
        return bool(d.scale_to and d.opts.upscaling_crop)

    def what(self, d: Draft) -> str:
        return "a centre crop"

    def emulate(self, d: Draft) -> None:
        d.crop = d.scale_to

    def approximate(self, d: Draft) -> None:
        _approximated(d, "upscaling_crop", self.what(d), "the image is not cropped")


class BlendSecondUpscaler(Feature):
    """`upscaler_2` with `extras_upscaler_2_visibility` v > 0: the same upscale of the original
    input with the second upscaler, then `Image.blend(first, second, v)`. With v null or 0, or
    `upscaler_2` null, "" or "None", it is ignored, as V2 did."""

    name = "upscaler_2"
    fields = ("upscaler_2", "extras_upscaler_2_visibility")
    v3 = "no blend: run a second V3 job and blend the two results locally"
    effects = {"emulate": "a second branch, then Image.blend, locally",
               "approximate": "`upscaler_2` ignored, with a `warn`",
               "strict": "code 10"}

    def used_by(self, d: Draft) -> bool:
        name = d.opts.upscaler_2
        return bool(d.upscaler_1 and name and name != "None" and d.opts.extras_upscaler_2_visibility)

    def what(self, d: Draft) -> str:
        return f"blending {d.opts.upscaler_2!r} in"

    def emulate(self, d: Draft) -> None:
        d.upscaler_2 = lookup(d.mappings, "upscaler_2", str(d.opts.upscaler_2))

    def approximate(self, d: Draft) -> None:
        _approximated(d, "upscaler_2", self.what(d), "upscaler_2 is ignored")


class ResizeLocally(Feature):
    """The upscalers that are no model: `Lanczos` and `Nearest` (a Pillow resize) and `None`
    (no upscale at all: V2 then skipped the resize, the crop and the blend)."""

    name = "local_upscaler"
    fields = ("upscaler_1", "upscaler_2")
    v3 = "no Lanczos, Nearest or None upscaler: resize locally"
    effects = {"emulate": "the Pillow resize(s) as A1111 ran them, locally; `None` returns the input",
               "approximate": "`Lanczos`/`Nearest` run as the default V3 model instead, with a `warn`; "
                              "`None` as under emulate",
               "strict": "code 10"}

    def used_by(self, d: Draft) -> bool:
        return d.upscaler_1 is None or any(not c.is_model for c in d.branches)

    def what(self, d: Draft) -> str:
        names = [repr(c.name) for c in d.branches if not c.is_model] or ["'None'"]
        return f"{' and '.join(names)} (a local resize)"

    def field(self, d: Draft) -> str:
        return next((c.field for c in d.branches if not c.is_model), "upscaler_1")

    def approximate(self, d: Draft) -> str | None:
        if d.upscaler_1 is None:
            return "emulate"  # nothing to approximate: no upscale costs nothing
        model = d.default_model()
        for slot in ("upscaler_1", "upscaler_2"):
            choice = getattr(d, slot)
            if choice and not choice.is_model:
                _approximated(d, slot, f"{choice.name!r} (a local resize)",
                              f"V3 model {model.upscaler.v3_model} runs instead")
                # counted as exact: this warning already names the model that runs
                exact = model.upscaler.model_copy(update={"exact": True})
                setattr(d, slot, replace(choice, name=model.name, upscaler=exact))
        return None


class SubstituteNearestModel(Feature):
    """An upscaler whose weights V3 doesn't have (`R-ESRGAN 4x+`, the SDK default, `ESRGAN_4x`,
    `LDSR`, `SwinIR 4x`, ...) runs as the nearest V3 model: the same size, different pixels."""

    name = "model"
    fields = ("upscaler_1", "upscaler_2")
    default = "approximate"
    allowed = ("approximate", "strict")
    verdict = "change"
    v3 = "model_name: the nearest of RealESRGAN_x4plus_anime_6B, RealESRNet_x4plus, 4x-UltraSharp"
    effects = {"approximate": "the nearest V3 model, with a `warn`",
               "strict": "code 2"}
    refusal_code = V2Code.MODEL_NOT_EXIST

    def used_by(self, d: Draft) -> bool:
        return any(c.is_model and not c.upscaler.exact for c in d.branches)

    def what(self, d: Draft) -> str:
        names = [repr(c.name) for c in d.branches if c.is_model and not c.upscaler.exact]
        return f"{' and '.join(names)} (no same-weights V3 model)"

    def field(self, d: Draft) -> str:
        return next(c.field for c in d.branches if c.is_model and not c.upscaler.exact)

    def approximate(self, d: Draft) -> None:
        for c in d.branches:
            if c.is_model and not c.upscaler.exact:
                d.warnings.append(f"{c.field} {c.name!r} runs as V3 model {c.upscaler.v3_model} ({c.upscaler.note})")


class ChainNativePasses(Feature):
    """A factor outside V3's (1, 4]: above 4, A1111 chained the model's native 4x passes (at most
    three) and resized the result; at 1 or less it resized locally, after one model pass in the
    releases before 1.7."""

    name = "factor"
    fields = ("upscaling_resize",)
    v3 = "scale_factor takes (1, 4] only: chain jobs at 4 for more, resize locally for 1 or less"
    effects = {"emulate": "native 4x V3 passes as the A1111 release ran them, then LANCZOS to the exact size",
               "approximate": "over 4: one V3 job at 4 (a smaller image), with a `warn`; "
                              "1 or less: as under emulate (no V3 job can do it)",
               "strict": "code 10"}

    def used_by(self, d: Draft) -> bool:
        return any(c.is_model for c in d.branches) and not d.factor_in_v3_range

    def what(self, d: Draft) -> str:
        return f"a factor of {d.factor:g}"

    def emulate(self, d: Draft) -> None:
        d.native_passes = True

    def approximate(self, d: Draft) -> str | None:
        if d.factor <= 1:
            d.native_passes = True
            return "emulate"
        _approximated(d, "upscaling_resize", self.what(d), f"V3 upscales by {V3_MAX_FACTOR:g}")
        d.factor_cap = V3_MAX_FACTOR
        return None


class UpscaleAtNativeScale(Feature):
    """A1111 ran a model at its native 4x and resized the result to the target with LANCZOS; V3
    resamples to `scale_factor` itself. The size is the same, the pixels differ slightly. By
    default the proxy asks V3 for the factor (one job, no warning); `emulate` gives A1111's pixels."""

    name = "native_scale"
    fields = ("upscaling_resize",)
    default = "approximate"
    allowed = ("emulate", "approximate")
    verdict = "same"
    v3 = "scale_factor: V3 resamples to the factor itself, with slightly different pixels"
    effects = {"emulate": "native 4x V3 pass(es), then LANCZOS to the exact size, locally",
               "approximate": "one V3 job at the factor (no `warn`); composed only where the release's "
                              "size differs from V3's"}

    def used_by(self, d: Draft) -> bool:
        return any(c.is_model for c in d.branches) and d.factor_in_v3_range and not d.factor_cap

    def what(self, d: Draft) -> str:
        return f"a factor of {d.factor:g}"

    def emulate(self, d: Draft) -> None:
        d.native_passes = True

    def approximate(self, d: Draft) -> None:
        return None


class DropAlpha(Feature):
    """A model got the image's pixels only: A1111 converted the input to RGB (before 1.9 every
    input, from 1.9 only what a model got), so alpha and a PNG transparency colour key never
    reached it. V3 keeps them."""

    name = "alpha"
    fields = ("image",)
    verdict = "change"
    v3 = "V3 keeps the alpha channel V2 dropped: convert the image to RGB first if that matters"
    effects = {"emulate": "V3 gets the pixels as an RGB PNG, without alpha or colour key",
               "approximate": "V3 gets the image as sent, alpha included, with a `warn`",
               "strict": "code 10"}

    def used_by(self, d: Draft) -> bool:
        return d.image.has_alpha and any(c.is_model for c in d.branches)

    def what(self, d: Draft) -> str:
        return "an image with transparency"

    def emulate(self, d: Draft) -> None:
        d.v3_pixels = True

    def approximate(self, d: Draft) -> None:
        _approximated(d, "image", self.what(d), "V3 sees the alpha channel")


class RestoreFaces(Feature):
    """GFPGAN, then CodeFormer, after the upscale, each blended in by its visibility. V3 has no
    face restoration; the proxy uses an A1111-compatible server when the operator runs one
    (`UPSCALE_PROXY_FACE_RESTORER_URL`), and otherwise skips it with a `warn`."""

    name = "face"
    fields = ("gfpgan_visibility", "codeformer_visibility", "codeformer_weight")
    v3 = "no face restoration: drop the field, or run GFPGAN/CodeFormer yourself"
    effects = {"emulate": "restored on the configured A1111-compatible server; without one, skipped "
                          "with a `warn`",
               "approximate": "skipped, with a `warn`",
               "strict": "code 10"}

    def used_by(self, d: Draft) -> bool:
        return bool(d.opts.gfpgan_visibility or d.opts.codeformer_visibility)

    def what(self, d: Draft) -> str:
        return "face restoration (no V3 successor)"

    def field(self, d: Draft) -> str:
        return "gfpgan_visibility" if d.opts.gfpgan_visibility else "codeformer_visibility"

    def emulate(self, d: Draft) -> str | None:
        if not d.faces_available:
            return self.approximate(d)
        o = d.opts
        d.faces = RestoreFacesStep(gfpgan_visibility=o.gfpgan_visibility or 0.0,
                                   codeformer_visibility=o.codeformer_visibility or 0.0,
                                   codeformer_weight=o.codeformer_weight or 0.0)
        return None

    def approximate(self, d: Draft) -> str:
        for field in ("gfpgan_visibility", "codeformer_visibility"):
            if getattr(d.opts, field):
                d.warnings.append(f"{field} ignored: face restoration has no V3 successor")
        return "skip"


class KeepImagesPastV3Ttl(Feature):
    """`img_expire_ttl` over 3600 s: V2 kept the image that long; V3's image URLs live 3600 s.
    (A composed result is kept for `img_expire_ttl` anyway.)"""

    name = "img_expire_ttl"
    fields = ("img_expire_ttl",)
    verdict = "change"
    v3 = "image URLs live 3600 s: copy results to your own storage (or extra.custom_storage)"
    effects = {"emulate": "the proxy fetches V3's image and serves it for the whole TTL (composed)",
               "approximate": "V3's URL, which expires after 3600 s, with a `warn`",
               "strict": "code 10"}

    def used_by(self, d: Draft) -> bool:
        return (d.opts.img_expire_ttl or 0) > V3_URL_TTL and d.plan().direct is not None

    def what(self, d: Draft) -> str:
        return f"{d.opts.img_expire_ttl} s"

    def emulate(self, d: Draft) -> None:
        d.keep_images = True

    def approximate(self, d: Draft) -> None:
        _approximated(d, "img_expire_ttl", self.what(d), f"V3 image URLs expire after {V3_URL_TTL} s")


# The planner's order: the input first, then the geometry, the upscalers, how models run, what
# they are given, the steps after the upscale, and last what depends on the path taken.
REGISTRY: tuple[Feature, ...] = (
    ApplyExifOrientation(), ScaleToExactSize(), CropToCentre(), BlendSecondUpscaler(), ResizeLocally(),
    SubstituteNearestModel(), ChainNativePasses(), UpscaleAtNativeScale(), DropAlpha(), RestoreFaces(),
    KeepImagesPastV3Ttl(),
)
BY_NAME: dict[str, Feature] = {unit.name: unit for unit in REGISTRY}


def default_policies() -> dict[str, Policy]:
    return {unit.name: unit.default for unit in REGISTRY}
