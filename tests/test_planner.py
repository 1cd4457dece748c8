"""The planner, no server: a V2 body and the image's header -> the Plan (spec sections 1, 7 and 8).

Each feature unit of the registry is checked for when it applies and what each policy it allows does
to the plan; then the geometry (direct or composed, the passes of each A1111 release line, the 2048 px
limits), the fields a resize mode ignores, and the Plan's JSON form.
"""

from __future__ import annotations

import base64

import pytest
from PIL import Image

from proxy import mappings
from proxy.errors import V2Code, V2Error
from proxy.translate.features import ALL, BY_NAME, REGISTRY, default_policies
from proxy.translate.plan import Plan
from proxy.translate.planner import plan_upscale
from proxy.translate.profiles import PROFILES
from proxy.translate.steps import (
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
from proxy.v2.translation import Translator
from tests.images import b64, encode, pattern

M = mappings.load()
ULTRA = "4x-UltraSharp"  # a model with the same weights in V3: no `model` decision in the way
LATER = ("v1.6", "v1.8", "v1.9", "v1.9.4", "v1.10")  # the lines that round the target to a multiple of 8


def png(w: int, h: int, mode: str = "RGB", has_alpha: bool | None = None) -> ImageInfo:
    alpha = mode in ("RGBA", "LA") if has_alpha is None else has_alpha
    return ImageInfo("PNG", w, h, 1000, mode, alpha)


def jpeg(w: int, h: int, orientation: int = 1) -> ImageInfo:
    return ImageInfo("JPEG", w, h, 1000, "RGB", False, orientation)


def plan_of(image: ImageInfo, *, profile: str = "v1.3", faces: bool = False, policies: dict | None = None,
            **fields) -> Plan:
    """The plan for a body of `fields` (upscaler_1 4x-UltraSharp unless given) under the default policies
    with `policies` on top."""
    fields.setdefault("upscaler_1", ULTRA)
    return plan_upscale(V2UpscaleOptions(**fields), image, M, {**default_policies(), **(policies or {})},
                        PROFILES[profile], faces)


def refusal(image: ImageInfo, **kw) -> V2Error:
    with pytest.raises(V2Error) as e:
        plan_of(image, **kw)
    return e.value


def translate(**fields):
    """A real body through the Translator (validation, probe, plan), with a 64x48 PNG."""
    return Translator(M).translate(fields, b64(64, 48).encode())


# --- the registry -------------------------------------------------------------------------------

# a request that uses each unit: (fields, image, profile)
USES: dict[str, tuple[dict, ImageInfo, str]] = {
    "orientation": ({"upscaling_resize": 2}, jpeg(64, 48, orientation=6), "v1.9"),
    "scale_to": ({"resize_mode": 1, "upscaling_resize_w": 128, "upscaling_resize_h": 80}, png(64, 48), "v1.3"),
    "crop": ({"resize_mode": 1, "upscaling_resize_w": 100, "upscaling_resize_h": 100, "upscaling_crop": True},
             png(64, 48), "v1.3"),
    "upscaler_2": ({"upscaler_2": "R-ESRGAN 4x+ Anime6B", "extras_upscaler_2_visibility": 0.3}, png(64, 48), "v1.3"),
    "local_upscaler": ({"upscaler_1": "Lanczos", "upscaling_resize": 2}, png(64, 48), "v1.3"),
    "model": ({"upscaler_1": "ESRGAN_4x", "upscaling_resize": 2}, png(64, 48), "v1.3"),
    "factor": ({"upscaling_resize": 6}, png(10, 10), "v1.3"),
    "native_scale": ({"upscaling_resize": 2}, png(64, 48), "v1.3"),
    "alpha": ({"upscaling_resize": 2}, png(64, 48, "RGBA"), "v1.3"),
    "face": ({"upscaling_resize": 2, "gfpgan_visibility": 0.5}, png(64, 48), "v1.3"),
    "img_expire_ttl": ({"upscaling_resize": 2, "img_expire_ttl": 7200}, png(64, 48), "v1.3"),
}
# the field a strict refusal of the USES request names
REFUSED_FIELD = {"orientation": "image", "scale_to": "resize_mode", "crop": "upscaling_crop",
                 "upscaler_2": "upscaler_2", "local_upscaler": "upscaler_1", "model": "upscaler_1",
                 "factor": "upscaling_resize", "alpha": "image", "face": "gfpgan_visibility",
                 "img_expire_ttl": "img_expire_ttl"}
# requests like those that don't use the unit
UNUSED: list[tuple[str, dict, ImageInfo, str]] = [
    ("orientation", {"upscaling_resize": 2}, jpeg(64, 48, orientation=6), "v1.8"),  # read as stored before 1.9
    ("orientation", {"upscaling_resize": 2}, jpeg(64, 48, orientation=1), "v1.9"),
    ("scale_to", {"resize_mode": 0, "upscaling_resize_w": 128, "upscaling_resize_h": 80}, png(64, 48), "v1.3"),
    ("scale_to", {"upscaler_1": "None", "resize_mode": 1, "upscaling_resize_w": 128, "upscaling_resize_h": 80},
     png(64, 48), "v1.3"),
    ("crop", {"upscaling_resize": 2, "upscaling_crop": True}, png(64, 48), "v1.3"),
    ("crop", {"resize_mode": 1, "upscaling_resize_w": 100, "upscaling_resize_h": 100, "upscaling_crop": False},
     png(64, 48), "v1.3"),
    ("upscaler_2", {"upscaler_2": "Lanczos", "extras_upscaler_2_visibility": 0}, png(64, 48), "v1.3"),
    ("upscaler_2", {"upscaler_2": "Lanczos", "extras_upscaler_2_visibility": None}, png(64, 48), "v1.3"),
    ("upscaler_2", {"upscaler_2": "None", "extras_upscaler_2_visibility": 0.5}, png(64, 48), "v1.3"),
    ("upscaler_2", {"upscaler_2": "", "extras_upscaler_2_visibility": 0.5}, png(64, 48), "v1.3"),
    ("upscaler_2", {"upscaler_1": "None", "upscaler_2": "Lanczos", "extras_upscaler_2_visibility": 0.5},
     png(64, 48), "v1.3"),
    ("local_upscaler", {"upscaling_resize": 2}, png(64, 48), "v1.3"),
    ("model", {"upscaler_1": "R-ESRGAN 4x+ Anime6B"}, png(64, 48), "v1.3"),
    ("model", {"upscaler_1": "Lanczos"}, png(64, 48), "v1.3"),
    ("factor", {"upscaling_resize": 4}, png(10, 10), "v1.3"),
    ("factor", {"upscaler_1": "Nearest", "upscaling_resize": 6}, png(10, 10), "v1.3"),
    ("native_scale", {"upscaler_1": "Lanczos", "upscaling_resize": 2}, png(64, 48), "v1.3"),
    ("native_scale", {"upscaling_resize": 6}, png(10, 10), "v1.3"),  # that is `factor`
    ("alpha", {"upscaling_resize": 2}, png(64, 48), "v1.3"),
    ("alpha", {"upscaler_1": "Lanczos", "upscaling_resize": 2}, png(64, 48, "RGBA"), "v1.3"),  # no model sees it
    ("face", {"gfpgan_visibility": 0, "codeformer_visibility": 0, "codeformer_weight": 0.5}, png(64, 48), "v1.3"),
    ("img_expire_ttl", {"img_expire_ttl": 3600}, png(64, 48), "v1.3"),
    ("img_expire_ttl", {"upscaler_1": "Lanczos", "img_expire_ttl": 7200}, png(64, 48), "v1.3"),  # composed anyway
]


def plan_using(name: str, policy: str | None = None, **kw) -> Plan:
    fields, image, profile = USES[name]
    return plan_of(image, profile=profile, policies={name: policy} if policy else None, **fields, **kw)


def test__registry__has_one_request_here_for_every_unit():
    assert set(USES) == set(BY_NAME) == {unit.name for unit in REGISTRY}
    assert len(REGISTRY) == len(BY_NAME)


@pytest.mark.parametrize("unit", REGISTRY, ids=lambda u: u.name)
def test__each_unit__offers_exactly_the_policies_it_allows(unit):
    assert unit.default in unit.allowed and set(unit.allowed) <= set(ALL)
    assert set(unit.effects) == set(unit.allowed)  # what the guide and report describe is what can be chosen
    assert default_policies()[unit.name] == unit.default


def test__policies_not_allowed__are_exactly_these():
    refused = {(u.name, p) for u in REGISTRY for p in ALL if p not in u.allowed}
    assert refused == {("scale_to", "approximate"), ("model", "emulate"), ("native_scale", "strict")}


@pytest.mark.parametrize("name", USES)
def test__each_unit__is_used_by_a_request_that_needs_it(name):
    assert name in plan_using(name).decisions


@pytest.mark.parametrize(("name", "fields", "image", "profile"), UNUSED,
                         ids=[f"{case[0]}-{i}" for i, case in enumerate(UNUSED)])
def test__each_unit__is_not_used_by_a_request_without_it(name, fields, image, profile):
    assert name not in plan_of(image, profile=profile, **fields).decisions


@pytest.mark.parametrize(("name", "policy"), [(u.name, p) for u in REGISTRY for p in u.allowed if p != "strict"])
def test__each_allowed_policy__plans_and_records_its_decision(name, policy):
    decision = plan_using(name, policy).decisions[name]
    assert decision in (policy, "emulate", "skip")  # an approximation may come down to emulate or skip


@pytest.mark.parametrize("name", [u.name for u in REGISTRY if "strict" in u.allowed])
def test__strict__refuses_with_the_units_code_naming_the_field(name):
    fields, image, profile = USES[name]
    e = refusal(image, profile=profile, policies={name: "strict"}, **fields)
    assert e.code == BY_NAME[name].refusal_code == (V2Code.MODEL_NOT_EXIST if name == "model" else V2Code.NOT_SUPPORT)
    assert e.msg.startswith(f"{REFUSED_FIELD[name]}: ") and "strict policy" in e.msg


@pytest.mark.parametrize(("name", "fields", "field"), [
    ("local_upscaler", {"upscaler_2": "Lanczos", "extras_upscaler_2_visibility": 0.5}, "upscaler_2"),
    ("model", {"upscaler_2": "ESRGAN_4x", "extras_upscaler_2_visibility": 0.5}, "upscaler_2"),
    ("face", {"codeformer_visibility": 0.5}, "codeformer_visibility"),
])
def test__strict__names_the_field_the_request_used_not_the_units_first(name, fields, field):
    e = refusal(png(64, 48), policies={name: "strict"}, upscaling_resize=2, **fields)
    assert e.msg.startswith(f"{field}: "), e.msg


def test__strict_everywhere__still_plans_a_request_v3_can_do_as_is():
    strict = {u.name: "strict" for u in REGISTRY if "strict" in u.allowed}
    plan = plan_of(png(64, 48), policies=strict, upscaler_1="R-ESRGAN 4x+ Anime6B", upscaling_resize=2)
    assert plan.direct == V3Job(model="RealESRGAN_x4plus_anime_6B", scale_factor=2, size_in=(64, 48),
                                size_out=(128, 96))
    assert plan.decisions == {"native_scale": "approximate"} and plan.warn == ""


# --- orientation (ApplyExifOrientation) ---------------------------------------------------------

def test__orientation_emulate__turns_the_input_upright_and_sends_v3_those_pixels():
    plan = plan_using("orientation", "emulate")
    assert plan.read == ReadInput(keep_rgba=True, exif_orientation=True) and plan.v3_input == "pixels"
    assert plan.input_size == (48, 64) and plan.output_size == (96, 128)
    assert plan.direct == V3Job(model=ULTRA, scale_factor=2, size_in=(48, 64), size_out=(96, 128))
    assert plan.warn == ""


def test__orientation_emulate__a_half_turn_keeps_the_sides():
    plan = plan_of(jpeg(64, 48, orientation=3), profile="v1.9", upscaling_resize=2)
    assert plan.decisions["orientation"] == "emulate" and plan.input_size == (64, 48) and plan.read.exif_orientation


def test__orientation_approximate__upscales_the_stored_pixels_with_a_warning():
    plan = plan_using("orientation", "approximate")
    assert plan.read == ReadInput(keep_rgba=True, exif_orientation=False) and plan.v3_input == "as_sent"
    assert plan.input_size == (64, 48) and plan.output_size == (128, 96) and plan.direct is not None
    assert plan.warn.startswith("image: an EXIF orientation of 6 approximated")


def test__orientation__sets_the_cover_factor_on_the_upright_size():
    plan = plan_of(jpeg(60, 30, orientation=6), profile="v1.9", resize_mode=1, upscaling_resize_w=60,
                   upscaling_resize_h=240)
    assert plan.input_size == (30, 60) and plan.direct.scale_factor == 4 and plan.output_size == (120, 240)


# --- scale_to (ScaleToExactSize) and crop (CropToCentre) -------------------------------------------

def test__scale_to_without_crop__returns_the_cover_scaled_image():
    plan = plan_using("scale_to", "emulate")
    assert plan.decisions["scale_to"] == "emulate"
    assert plan.direct == V3Job(model=ULTRA, scale_factor=2, size_in=(64, 48), size_out=(128, 96))
    assert plan.output_size == (128, 96)


def test__scale_to_with_crop__returns_exact_target_size():
    plan = plan_using("crop", "emulate")
    (branch,) = plan.branches
    assert plan.path == "composed" and plan.output_size == (100, 100)
    assert branch.v3_jobs == (V3Job(model=ULTRA, scale_factor=100 / 48, size_in=(64, 48), size_out=(133, 100)),)
    assert branch.steps == (CropToCanvas(size=(100, 100)),)
    assert plan.decisions == {"scale_to": "emulate", "crop": "emulate", "native_scale": "approximate"}


def test__crop_approximate__returns_the_uncropped_cover_size_with_a_warning():
    plan = plan_using("crop", "approximate")
    assert plan.output_size == (133, 100) and plan.direct is not None
    assert not any(isinstance(s, CropToCanvas) for b in plan.branches for s in b.steps)
    assert plan.warn.startswith("upscaling_crop: a centre crop approximated")


def test__crop_in_a_later_line__crops_after_the_resize_to_a_multiple_of_8():
    plan = plan_of(png(64, 48), profile="v1.6", resize_mode=1, upscaling_resize_w=100, upscaling_resize_h=100,
                   upscaling_crop=True)
    assert plan.branches[0].steps == (Resize(size=(128, 96)), CropToCanvas(size=(100, 100)))
    assert plan.output_size == (100, 100)


def test__crop_approximate__that_would_leave_the_output_over_2048__is_code_6():
    fields = {"upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 2000, "upscaling_resize_h": 100,
              "upscaling_crop": True}
    assert plan_of(png(100, 200), **fields).output_size == (2000, 100)  # 2000 x 4000, cropped
    e = refusal(png(100, 200), policies={"crop": "approximate"}, **fields)
    assert e.code == 6 and "without the crop" in e.msg


# --- upscaler_2 (BlendSecondUpscaler) -------------------------------------------------------------

@pytest.mark.parametrize(("profile", "to_first_mode"), [("v1.3", False), ("v1.8", False), ("v1.9", True)])
def test__upscaler_2_emulate__is_a_second_branch_blended_in(profile, to_first_mode):
    fields, image, _ = USES["upscaler_2"]
    plan = plan_of(image, profile=profile, **fields)
    assert [(b.field, b.upscaler) for b in plan.branches] == [("upscaler_1", ULTRA),
                                                                ("upscaler_2", "R-ESRGAN 4x+ Anime6B")]
    assert plan.branches[1].v3_jobs[0].model == "RealESRGAN_x4plus_anime_6B"
    assert plan.blend == Blend(visibility=0.3, to_first_mode=to_first_mode) and plan.path == "composed"


def test__upscaler_2_approximate__is_ignored_with_a_warning():
    plan = plan_using("upscaler_2", "approximate")
    assert plan.direct is not None and plan.blend is None and plan.branches == ()
    assert plan.warn.startswith("upscaler_2: blending 'R-ESRGAN 4x+ Anime6B' in approximated")


def test__upscaler_2_unknown_name_blended_in__is_code_2():
    e = refusal(png(64, 48), upscaler_2="nope", extras_upscaler_2_visibility=0.5)
    assert e.code == 2 and e.msg.startswith("upscaler_2: ")


# --- local_upscaler (ResizeLocally) ---------------------------------------------------------------

@pytest.mark.parametrize(("name", "filt"), [("Lanczos", "LANCZOS"), ("Nearest", "NEAREST")])
def test__local_upscaler_emulate__is_a_pillow_resize_and_no_v3_job(name, filt):
    plan = plan_of(png(64, 48), upscaler_1=name, upscaling_resize=2)
    assert plan.decisions == {"local_upscaler": "emulate"} and plan.v3_jobs == 0
    assert plan.branches == (Branch(field="upscaler_1", upscaler=name, steps=(Resize(size=(128, 96), filter=filt),)),)


def test__upscaler_none__returns_the_input_as_read():
    plan = plan_of(png(64, 48), upscaler_1="None", upscaling_resize=3, upscaler_2="Lanczos",
                   extras_upscaler_2_visibility=0.5, upscaling_crop=True)
    assert plan.decisions == {"local_upscaler": "emulate"}
    assert plan.branches == () and plan.blend is None and plan.output_size == (64, 48) and plan.path == "composed"
    assert "no upscale" in plan.describe()[1]


def test__local_upscaler_approximate__runs_the_default_v3_model_with_a_warning_naming_it():
    plan = plan_using("local_upscaler", "approximate")
    assert plan.direct == V3Job(model="RealESRNet_x4plus", scale_factor=2, size_in=(64, 48), size_out=(128, 96))
    assert plan.warn == "upscaler_1: 'Lanczos' (a local resize) approximated: V3 model RealESRNet_x4plus runs instead"
    assert "model" not in plan.decisions  # one warning is enough


def test__local_upscaler_approximate__of_none__is_still_no_upscale():
    plan = plan_of(png(64, 48), policies={"local_upscaler": "approximate"}, upscaler_1="None")
    assert plan.decisions == {"local_upscaler": "emulate"} and plan.v3_jobs == 0 and plan.output_size == (64, 48)


def test__local_upscaler__as_upscaler_2__is_a_local_branch():
    plan = plan_of(png(64, 48), upscaling_resize=2, upscaler_2="Lanczos", extras_upscaler_2_visibility=0.5)
    assert plan.decisions["local_upscaler"] == "emulate"
    assert plan.branches[1] == Branch(field="upscaler_2", upscaler="Lanczos", steps=(Resize(size=(128, 96)),))


# --- model (SubstituteNearestModel) ---------------------------------------------------------------

def test__model_approximate__runs_the_nearest_v3_model_with_a_warning():
    plan = plan_using("model", "approximate")
    assert plan.direct.model == "RealESRNet_x4plus"
    assert plan.warn == ("upscaler_1 'ESRGAN_4x' runs as V3 model RealESRNet_x4plus "
                         "(closest V3 model, not the same weights)")


def test__null_upscaler_1__is_the_sdk_default_run_as_the_nearest_model():
    plan = plan_of(png(64, 48), upscaler_1=None)
    assert plan.direct.model == "RealESRNet_x4plus" and plan.decisions["model"] == "approximate"
    assert "'R-ESRGAN 4x+'" in plan.warn


def test__unknown_upscaler_1__is_code_2():
    e = refusal(png(64, 48), upscaler_1="R-ESRGAN 5x+")
    assert e.code == 2 and e.msg == "upscaler_1: unknown upscaler 'R-ESRGAN 5x+'"


# --- factor (ChainNativePasses) and native_scale (UpscaleAtNativeScale) ----------------------------

def test__factor_emulate__chains_native_passes_then_resizes():
    plan = plan_using("factor", "emulate")
    (branch,) = plan.branches
    assert branch.v3_jobs == (V3Job(model=ULTRA, scale_factor=4, size_in=(10, 10), size_out=(40, 40)),
                              V3Job(model=ULTRA, scale_factor=4, size_in=(40, 40), size_out=(160, 160)))
    assert branch.steps == (Resize(size=(60, 60)),) and plan.output_size == (60, 60)


def test__factor_approximate_over_4__is_one_v3_job_at_4_with_a_warning():
    plan = plan_using("factor", "approximate")
    assert plan.direct == V3Job(model=ULTRA, scale_factor=4, size_in=(10, 10), size_out=(40, 40))
    assert plan.output_size == (40, 40) and "native_scale" not in plan.decisions
    assert plan.warn == "upscaling_resize: a factor of 6 approximated: V3 upscales by 4"


def test__factor_approximate_at_or_below_1__is_emulated():
    emulated = plan_of(png(64, 48), upscaling_resize=0.5)
    approximated = plan_of(png(64, 48), policies={"factor": "approximate"}, upscaling_resize=0.5)
    assert approximated.decisions == {"factor": "emulate"}
    assert approximated.branches == emulated.branches and approximated.warn == ""


def test__native_scale_approximate__is_one_v3_job_at_the_factor():
    plan = plan_using("native_scale")
    assert plan.decisions == {"native_scale": "approximate"} and plan.warn == ""
    assert plan.direct == V3Job(model=ULTRA, scale_factor=2, size_in=(64, 48), size_out=(128, 96))


def test__native_scale_emulate__is_a_native_4x_pass_then_lanczos():
    plan = plan_using("native_scale", "emulate")
    (branch,) = plan.branches
    assert branch.v3_jobs == (V3Job(model=ULTRA, scale_factor=4, size_in=(64, 48), size_out=(256, 192)),)
    assert branch.steps == (Resize(size=(128, 96), filter="LANCZOS"),) and plan.output_size == (128, 96)


def test__native_scale_emulate__at_4__is_one_direct_pass():
    plan = plan_of(png(64, 48), policies={"native_scale": "emulate"}, upscaling_resize=4)
    assert plan.decisions["native_scale"] == "emulate"
    assert plan.direct == V3Job(model=ULTRA, scale_factor=4, size_in=(64, 48), size_out=(256, 192))


# --- alpha (DropAlpha) ----------------------------------------------------------------------------

def test__alpha_emulate__sends_v3_the_rgb_pixels():
    plan = plan_using("alpha", "emulate")
    assert plan.direct is not None and plan.v3_input == "pixels" and plan.warn == ""


def test__alpha_approximate__sends_the_image_as_it_came_with_a_warning():
    plan = plan_using("alpha", "approximate")
    assert plan.direct is not None and plan.v3_input == "as_sent"
    assert plan.warn.startswith("image: an image with transparency approximated")


@pytest.mark.parametrize(("image", "profile", "keep"), [
    (png(64, 48, "RGB", has_alpha=True), "v1.3", True),  # an RGB colour key came back on the result
    (png(64, 48, "P", has_alpha=True), "v1.8", False),  # A1111 failed on these up to 1.8
    (png(64, 48, "P", has_alpha=True), "v1.10", True),  # converted first, then written as an RGB key
    (png(64, 48, "L", has_alpha=True), "v1.10", True),
    (png(64, 48, "RGBA"), "v1.10", False),
    (png(64, 48, "RGB"), "v1.3", False),
])
def test__transparency_colour_key__is_kept_on_the_result_where_v2_kept_it(image, profile, keep):
    plan = plan_of(image, profile=profile, upscaling_resize=2)
    assert plan.keep_colour_key is keep
    assert ("alpha" in plan.decisions) is image.has_alpha


# --- face (RestoreFaces) --------------------------------------------------------------------------

def test__face_emulate_with_a_restorer__restores_after_the_upscale():
    plan = plan_using("face", "emulate", faces=True, codeformer_visibility=0.25, codeformer_weight=0.7)
    assert plan.decisions["face"] == "emulate" and plan.path == "composed" and plan.warn == ""
    assert plan.faces == RestoreFaces(gfpgan_visibility=0.5, codeformer_visibility=0.25, codeformer_weight=0.7)
    assert plan.describe()[-1] == ("face restoration on the configured A1111 server: GFPGAN at visibility 0.5, "
                                   "then CodeFormer at visibility 0.25, weight 0.7")


def test__face_emulate_without_a_restorer__is_skipped_with_a_warning():
    plan = plan_using("face", "emulate")
    assert plan.decisions["face"] == "skip" and plan.faces is None and plan.direct is not None
    assert plan.warn == "gfpgan_visibility ignored: face restoration has no V3 successor"


def test__face_approximate__is_skipped_even_with_a_restorer():
    plan = plan_using("face", "approximate", faces=True)
    assert plan.decisions["face"] == "skip" and plan.faces is None and plan.direct is not None


# --- img_expire_ttl (KeepImagesPastV3Ttl) ---------------------------------------------------------

def test__img_expire_ttl_emulate__composes_to_keep_the_image():
    plan = plan_using("img_expire_ttl", "emulate")
    assert plan.path == "composed" and plan.ttl == 7200 and plan.v3_jobs == 1
    assert plan.branches[0].steps == () and plan.warn == ""


def test__img_expire_ttl_approximate__stays_direct_with_a_warning():
    plan = plan_using("img_expire_ttl", "approximate")
    assert plan.path == "direct" and plan.ttl == 7200
    assert plan.warn == "img_expire_ttl: 7200 s approximated: V3 image URLs expire after 3600 s"


# --- direct or composed ---------------------------------------------------------------------------

@pytest.mark.parametrize(("factor", "size", "target"), [
    (2, (64, 48), (128, 96)), (4, (512, 512), (2048, 2048)), (1.01, (99, 33), (99, 33)), (3.3, (10, 7), (33, 23)),
])
def test__one_v3_job_at_s_and_nothing_else__is_direct(factor, size, target):
    plan = plan_of(png(*size), upscaling_resize=factor)
    assert plan.path == "direct" and plan.branches == () and plan.v3_jobs == 1
    assert plan.direct == V3Job(model=ULTRA, scale_factor=factor, size_in=size, size_out=target)
    assert plan.output_size == target and plan.warn == ""


@pytest.mark.parametrize("profile", LATER)
def test__a_later_line_rounding_to_8__composes_with_a_lanczos_resize_where_v3_gives_another_size(profile):
    plan = plan_of(png(10, 7), profile=profile, upscaling_resize=3.3)
    (branch,) = plan.branches
    assert branch.v3_jobs == (V3Job(model=ULTRA, scale_factor=3.3, size_in=(10, 7), size_out=(33, 23)),)
    assert branch.steps == (Resize(size=(32, 16), filter="LANCZOS"),) and plan.output_size == (32, 16)


@pytest.mark.parametrize("profile", PROFILES)
def test__a_size_v3_gives_exactly__is_direct_in_every_line(profile):
    assert plan_of(png(64, 48), profile=profile, upscaling_resize=2).path == "direct"


@pytest.mark.parametrize("profile", LATER)
def test__nearest_in_a_later_line__resizes_with_its_filter_then_lanczos_to_the_multiple_of_8(profile):
    plan = plan_of(png(10, 7), profile=profile, upscaler_1="Nearest", upscaling_resize=3.3)
    assert plan.branches[0].steps == (Resize(size=(33, 23), filter="NEAREST"), Resize(size=(32, 16)))


@pytest.mark.parametrize("profile", PROFILES)
def test__read_input__keeps_rgba_from_v1_9(profile):
    plan = plan_of(png(64, 48), profile=profile, upscaling_resize=2)
    assert plan.read.keep_rgba is (profile in ("v1.9", "v1.9.4", "v1.10")) and plan.profile == profile


# --- the passes of each release line (spec 7.2) ----------------------------------------------------

PASSES = ("v1.3", "v1.6", "v1.8", "v1.9", "v1.9.4", "v1.10")


@pytest.mark.parametrize(("factor", "size", "passes"), [
    # at s == 1: a first pass always before 1.7; none from 1.7 (check before the pass); v1.9.4 never
    # stops at s == 1; v1.10 stops after one pass
    (1, (16, 16), (1, 1, 0, 0, 3, 1)),
    # below 1: the first pass only while the check came after it
    (0.5, (64, 48), (1, 1, 0, 0, 0, 0)),
    (6, (10, 10), (2, 2, 2, 2, 2, 2)),
    (16, (10, 10), (2, 2, 2, 2, 2, 2)),
    (16.1, (10, 10), (3, 2, 2, 2, 2, 2)),  # 161 needs a third pass; 160 (rounded to 8) does not
    (4.01, (100, 100), (2, 1, 1, 1, 1, 1)),  # 401 needs a second pass; 400 does not
])
def test__native_passes__per_release_line(factor, size, passes):
    for profile, expected in zip(PASSES, passes, strict=True):
        plan = plan_of(png(*size), profile=profile, upscaling_resize=factor)
        jobs = plan.branches[0].v3_jobs if plan.branches else (plan.direct,)
        assert len(jobs) == expected, profile
        assert all(job.scale_factor == 4 for job in jobs)
        assert [job.size_in for job in jobs] == [size, *(job.size_out for job in jobs)][:len(jobs)]  # a chain
        dest = PROFILES[profile].target(size, factor)
        assert plan.output_size == dest, profile
        last = jobs[-1].size_out if jobs else size
        assert (plan.branches[0].steps if plan.branches else ()) == ((Resize(size=dest),) if last != dest else ())


def test__at_s_1_from_v1_8__no_pass_and_no_resize__the_input_as_read():
    plan = plan_of(png(16, 16), profile="v1.8", upscaling_resize=1)
    assert plan.branches == (Branch(field="upscaler_1", upscaler=ULTRA),) and plan.output_size == (16, 16)
    assert plan.decisions == {"factor": "emulate"}


# --- limits -------------------------------------------------------------------------------------

def test__a_pass_that_would_send_v3_over_2048_px__is_code_6():
    e = refusal(png(600, 600), profile="v1.9.4", upscaling_resize=1)  # pass 2 would get 2400 x 2400
    assert e.code == 6 and e.msg.startswith("upscaler_1: pass 2 of '4x-UltraSharp'") and "2400x2400" in e.msg


def test__a_crop_within_2048_whose_cover_needs_a_pass_over_2048__is_code_6():
    e = refusal(png(600, 2), resize_mode=1, upscaling_resize_w=2048, upscaling_resize_h=10, upscaling_crop=True)
    assert e.code == 6 and "pass 2" in e.msg and "2400x8" in e.msg


@pytest.mark.parametrize("fields", [
    {"resize_mode": 1, "upscaling_resize_w": 4096, "upscaling_resize_h": 10},
    {"resize_mode": 1, "upscaling_resize_w": 4096, "upscaling_resize_h": 10, "upscaling_crop": True},
    {"upscaling_resize": 300},
    {"upscaler_1": "Lanczos", "upscaling_resize": 205},
    {"upscaling_resize": 2, "upscaler_2": "Lanczos", "extras_upscaler_2_visibility": 0.5, "img_expire_ttl": 9000,
     "gfpgan_visibility": 1, "resize_mode": 1, "upscaling_resize_w": 2049, "upscaling_resize_h": 8},
])
def test__output_over_2048__is_code_6_before_any_policy(fields):
    strict = {u.name: "strict" for u in REGISTRY if "strict" in u.allowed}
    e = refusal(png(10, 10), policies=strict, **fields)
    assert e.code == 6 and "over the 2048 px" in e.msg


def test__scale_to_cover_without_crop__can_exceed_2048():
    e = refusal(png(100, 200), resize_mode=1, upscaling_resize_w=2048, upscaling_resize_h=100)  # cover: 20.48
    assert e.code == 6 and "2048x4096" in e.msg


@pytest.mark.parametrize("profile", LATER)
def test__a_side_that_rounds_to_0_in_a_later_line__is_code_6_saying_why(profile):
    e = refusal(png(10, 5), profile=profile, upscaling_resize=1.5)
    assert e.code == 6 and e.msg == f"a factor of 1.5 makes 10x5 round to 8x0: A1111 {profile} could not upscale it"


def test__the_same_size_in_v1_3__plans():
    assert plan_of(png(10, 5), upscaling_resize=1.5).output_size == (15, 7)


@pytest.mark.parametrize("factor", [1e308, 1e300, 1e-300])
def test__an_absurd_factor__is_code_6_not_an_internal_error(factor):
    with pytest.raises(V2Error) as e:
        translate(upscaling_resize=factor)
    assert e.value.code == 6 and f"a factor of {factor:g}" in e.value.msg


# --- fields a resize mode does not use (through the Translator, with real images) -------------------

def test__mode_0__ignores_zero_width_and_height():
    t = translate(resize_mode=0, upscaling_resize=2, upscaling_resize_w=0, upscaling_resize_h=0)
    assert (t.image.width, t.image.height) == (64, 48)
    assert t.plan.direct.scale_factor == 2 and t.plan.output_size == (128, 96)


def test__mode_1__ignores_upscaling_resize_and_an_empty_upscaler_2():
    t = translate(resize_mode=1, upscaling_resize_w=100, upscaling_resize_h=80, upscaling_resize=4, upscaler_2="")
    assert t.plan.direct.scale_factor == 80 / 48 and t.plan.output_size == (106, 80)
    assert "upscaler_2" not in t.plan.decisions and t.plan.decisions["scale_to"] == "emulate"


@pytest.mark.parametrize("missing", [{}, {"upscaling_resize_w": 100}, {"upscaling_resize_h": 80}])
def test__mode_1_without_width_or_height__is_code_1(missing):
    with pytest.raises(V2Error) as e:
        translate(resize_mode=1, upscaling_resize=2, **missing)
    assert e.value.code == 1 and "required when resize_mode is 1" in e.value.msg


@pytest.mark.parametrize(("w", "h", "field"), [(0, 80, "upscaling_resize_w"), (100, -1, "upscaling_resize_h")])
def test__mode_1_with_a_side_below_1__is_code_6_naming_it(w, h, field):
    with pytest.raises(V2Error) as e:
        translate(resize_mode=1, upscaling_resize_w=w, upscaling_resize_h=h)
    assert e.value.code == 6 and e.value.msg.startswith(field)


def test__mode_0_with_a_factor_at_or_below_0__is_code_6():
    with pytest.raises(V2Error) as e:
        translate(resize_mode=0, upscaling_resize=0, upscaling_resize_w=100, upscaling_resize_h=80)
    assert e.value.code == 6 and e.value.msg.startswith("upscaling_resize")


# --- the Plan as JSON ------------------------------------------------------------------------------

@pytest.mark.parametrize(("image", "profile", "faces", "fields"), [
    (png(64, 48), "v1.3", False, {"upscaling_resize": 2}),
    (png(64, 48), "v1.3", False, {"upscaler_1": "None"}),
    (jpeg(60, 40, orientation=6), "v1.9", True, {
        "upscaler_1": "ESRGAN_4x", "resize_mode": 1, "upscaling_resize_w": 300, "upscaling_resize_h": 200,
        "upscaling_crop": True, "upscaler_2": "Nearest", "extras_upscaler_2_visibility": 0.5,
        "gfpgan_visibility": 0.5, "codeformer_visibility": 0.3, "codeformer_weight": 0.2,
        "img_expire_ttl": 86400}),
    (png(64, 48, "RGB", has_alpha=True), "v1.10", False, {"upscaling_resize": 6.5, "img_expire_ttl": 100}),
])
def test__plan__round_trips_through_json(image, profile, faces, fields):
    plan = plan_of(image, profile=profile, faces=faces, **fields)
    assert Plan.model_validate_json(plan.model_dump_json()) == plan


def test__the_round_trip_case__uses_every_kind_of_step():
    plan = plan_of(jpeg(60, 40, orientation=6), profile="v1.9", faces=True, upscaler_1="ESRGAN_4x", resize_mode=1,
                   upscaling_resize_w=300, upscaling_resize_h=200, upscaling_crop=True, upscaler_2="Nearest",
                   extras_upscaler_2_visibility=0.5, gfpgan_visibility=0.5)
    steps = {type(s) for b in plan.branches for s in (*b.v3_jobs, *b.steps)}
    assert steps == {V3Job, Resize, CropToCanvas} and plan.blend and plan.faces and plan.read.exif_orientation
    assert plan.warnings and len(plan.decisions) >= 6


# --- every upscaler in the table -----------------------------------------------------------------------

@pytest.mark.parametrize("name", list(M.upscalers.upscalers))
def test__every_listed_upscaler__plans(name):
    upscaler = M.upscalers.upscalers[name]
    plan = plan_of(png(32, 32), upscaler_1=name, upscaling_resize=2)
    if upscaler.v3_model:
        assert plan.direct.model == upscaler.v3_model and plan.output_size == (64, 64)
        assert (f"{name!r} runs as V3 model" in plan.warn) is not upscaler.exact
    elif upscaler.local == "none":
        assert plan.branches == () and plan.output_size == (32, 32)
    else:
        assert plan.branches[0].steps == (Resize(size=(64, 64), filter=upscaler.local),)


# --- the Translator keeps Plans: one per (body fields, image shape) -------------------------------

def test__translator__plans_a_repeated_body_once_and_keeps_each_images_own_facts():
    translator = Translator(M)
    first = translator.translate({"upscaling_resize": 2}, b64(64, 48).encode())
    flipped = encode(pattern(64, 48).transpose(Image.Transpose.FLIP_LEFT_RIGHT))  # other pixels, same shape
    again = translator.translate({"upscaling_resize": 2}, base64.b64encode(flipped))
    assert again.plan is first.plan and again.fields == first.fields == ("upscaling_resize",)
    assert again.image_b64 != first.image_b64  # the image forwarded is always the body's own
    other_shape = translator.translate({"upscaling_resize": 2}, b64(80, 48).encode())
    assert (other_shape.plan.output_size, first.plan.output_size) == ((160, 96), (128, 96))
    other_fields = translator.translate({"upscaling_resize": 3}, b64(64, 48).encode())
    assert other_fields.plan.direct.scale_factor == 3 != first.plan.direct.scale_factor


@pytest.mark.parametrize("fields, says", [({"upscaling_resize": 99}, "over the 2048 px"),  # the planner's
                                           ({"upscaling_resize": "2x"}, "upscaling_resize")])  # validation's
def test__translator__refuses_a_bad_body_every_time_it_comes(fields, says):
    translator = Translator(M)
    for _ in range(2):
        with pytest.raises(V2Error) as e:
            translator.translate(fields, b64(64, 48).encode())
        assert says in e.value.msg
