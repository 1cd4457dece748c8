"""Pure pieces, no server: body splitting, image probing, the Plan, error and progress mapping."""

import base64
import io
import json
import shutil

import pytest

from proxy import mappings
from proxy.errors import V2Error
from proxy.translate.errors import from_v3_error
from proxy.translate.plan import Plan, Policies, V3Job, plan_upscale
from proxy.translate.progress import progress_data
from proxy.v2.body import split_image
from proxy.v2.image import ImageInfo, probe
from proxy.v2.models import V2UpscaleOptions
from proxy.v3.models import TaskResult
from proxy.v3.payload import UpscaleBody
from tests.images import encode, pattern

M = mappings.load()


# --- body -------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    b'{"image": "QUJD", "upscaling_resize": 2}',
    b'{ "upscaling_resize" : 2 ,\n "image"\t:\t"QUJD" }',
    b'{"upscaler_1": "image", "image": "QUJD", "upscaling_resize": 2}',
    b'{"meta": {"image": "nested"}, "image": "QUJD", "upscaling_resize": 2}',
    b'{"image": "QU\\/D", "upscaling_resize": 2}',
    b'{"image": "x", "image": "QUJD", "upscaling_resize": 2}',
    b'{"\\u0069mage": "QUJD", "upscaling_resize": 2}',
])
def test__split_image__means_what_a_full_parse_means(raw):
    doc, image = split_image(raw)
    full = json.loads(raw)
    assert bytes(image) == full["image"].encode()
    without_image = {k: v for k, v in full.items() if k != "image"}
    assert {k: v for k, v in doc.items() if k != "image"} == without_image


def test__split_image__unescapes_json_escapes():
    _, image = split_image(b'{"image": "ab\\/cd"}')
    assert bytes(image) == b"ab/cd"


def test__split_image__fast_path_keeps_a_view_of_the_body():
    raw = b'{"image": "' + b"A" * 1000 + b'"}'
    _, image = split_image(raw)
    assert isinstance(image, memoryview) and image.obj is raw


def test__split_image__strips_a_data_uri():
    _, image = split_image(b'{"image": "data:image/jpeg;base64,QUJD"}')
    assert bytes(image) == b"QUJD"


def test__upscale_body__writes_the_image_into_valid_v3_json():
    image = memoryview(b'{"image": "QUJD"}')[11:15]
    body = UpscaleBody("4x-UltraSharp", 2.5, image)
    doc = json.loads(body.decode())
    assert doc == {"extra": {"response_image_type": "png"},
                   "request": {"model_name": "4x-UltraSharp", "scale_factor": 2.5, "image_base64": "QUJD"}}
    assert body.size == len(body.decode())


# --- probe ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("fmt", "mode"), [("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "P"),
                                           ("JPEG", "RGB"), ("WEBP", "RGB"), ("BMP", "RGB"), ("GIF", "P")])
def test__probe__reads_format_and_size(fmt, mode):
    raw = encode(pattern(37, 23, mode), fmt)
    info, text = probe(base64.b64encode(raw))
    assert (info.format, info.width, info.height, info.nbytes) == (fmt, 37, 23, len(raw))


def test__probe__finds_a_jpeg_header_behind_a_large_exif_block():
    im = pattern(40, 30)
    exif = im.getexif()
    exif[0x010E] = "x" * 60000  # ImageDescription: pushes the frame header past the first chunk
    raw = encode(im, "JPEG", exif=exif.tobytes())
    info, _ = probe(base64.b64encode(raw))
    assert (info.format, info.width, info.height) == ("JPEG", 40, 30)


def test__probe__rejects_padding_inside_the_text():
    first = base64.b64encode(encode(pattern(300, 300), "PNG"))
    broken = first[:64 * 1024 - 1] + b"=" + first[64 * 1024:]
    with pytest.raises(V2Error) as e:
        probe(broken)
    assert e.value.code == 6


# --- plan -------------------------------------------------------------------------------------

def info(w, h, alpha=False) -> ImageInfo:
    return ImageInfo("PNG", w, h, 1000, "RGBA" if alpha else "RGB", alpha)


@pytest.mark.parametrize(("factor", "size", "target"), [
    (2, (64, 48), (128, 96)), (4, (512, 512), (2048, 2048)), (1.01, (99, 33), (99, 33)),
    (3.3, (10, 7), (33, 23)),
])
def test__plan__direct_job_and_target(factor, size, target):
    plan = plan_upscale(V2UpscaleOptions(upscaling_resize=factor, upscaler_1="4x-UltraSharp"), info(*size), M)
    assert plan.direct == V3Job("4x-UltraSharp", factor)
    assert plan.output == target and plan.warn == ""


@pytest.mark.parametrize(("factor", "size", "passes"), [
    (1, (10, 10), 0), (0.5, (10, 10), 0), (4.01, (10, 10), 1), (4.1, (10, 10), 2), (16, (10, 10), 2),
    (16.1, (10, 10), 3), (4.5, (1, 1), 1),
])
def test__plan__native_passes_until_both_sides_reach_the_target(factor, size, passes):
    plan = plan_upscale(V2UpscaleOptions(upscaling_resize=factor, upscaler_1="4x-UltraSharp"), info(*size), M)
    assert plan.direct is None and plan.branches[0].passes == passes


def test__plan__a_pass_that_would_send_v3_over_2048_px_is_code_6():
    with pytest.raises(V2Error) as e:  # pass 2 would get 2400 x 8
        plan_upscale(V2UpscaleOptions(upscaling_resize=5, upscaler_1="4x-UltraSharp"), info(600, 2), M)
    assert e.value.code == 6


def test__plan__output_over_2048_is_code_6_before_any_policy():
    opts = V2UpscaleOptions(resize_mode=1, upscaling_resize_w=4096, upscaling_resize_h=10)
    with pytest.raises(V2Error) as e:
        plan_upscale(opts, info(10, 10), M, Policies(scale_to="strict"))
    assert e.value.code == 6


def test__plan__scale_to_cover_without_crop_can_exceed_2048():
    opts = V2UpscaleOptions(resize_mode=1, upscaling_resize_w=2048, upscaling_resize_h=100)
    with pytest.raises(V2Error) as e:
        plan_upscale(opts, info(100, 200), M)  # cover factor 20.48 -> 2048 x 4096
    assert e.value.code == 6 and "2048x4096" in e.value.msg


def test__plan__crop_keeps_the_output_at_the_requested_size():
    opts = V2UpscaleOptions(resize_mode=1, upscaling_resize_w=400, upscaling_resize_h=100, upscaling_crop=True)
    plan = plan_upscale(opts, info(100, 200), M)
    assert plan.output == (400, 100) and plan.scaled == (400, 800) and plan.crop == (400, 100)


def test__plan__scale_to_without_size_is_code_1():
    with pytest.raises(V2Error) as e:
        plan_upscale(V2UpscaleOptions(resize_mode=1, upscaling_resize_w=100), info(10, 10), M)
    assert e.value.code == 1 and "upscaling_resize_h" in e.value.msg


@pytest.mark.parametrize(("opts", "direct", "words"), [
    (V2UpscaleOptions(resize_mode=1, upscaling_resize_w=30, upscaling_resize_h=20, upscaling_crop=True),
     V3Job("RealESRNet_x4plus", 3.0), "resize_mode"),
    (V2UpscaleOptions(upscaling_resize=6), V3Job("RealESRNet_x4plus", 4.0), "upscaling_resize"),
    (V2UpscaleOptions(upscaler_1="Lanczos", upscaling_resize=2), V3Job("RealESRNet_x4plus", 2.0), "upscaler_1"),
    (V2UpscaleOptions(upscaler_2="Lanczos", extras_upscaler_2_visibility=0.5), V3Job("RealESRNet_x4plus", 2.0),
     "upscaler_2"),
    (V2UpscaleOptions(img_expire_ttl=7200), V3Job("RealESRNet_x4plus", 2.0), "img_expire_ttl"),
])
def test__plan__approximate_is_one_v3_job_and_a_warning(opts, direct, words):
    plan = plan_upscale(opts, info(10, 10), M, Policies(**dict.fromkeys(Policies.__dataclass_fields__, "approximate")))
    assert plan.direct == direct
    assert words in plan.warn


def test__plan__long_img_expire_ttl_composes_to_keep_the_image():
    plan = plan_upscale(V2UpscaleOptions(img_expire_ttl=7200, upscaler_1="4x-UltraSharp"), info(8, 8), M)
    assert plan.direct is None and plan.branches[0].passes == 1


def test__plan__alpha_input_stays_direct_with_an_rgb_input():
    plan = plan_upscale(V2UpscaleOptions(upscaler_1="4x-UltraSharp"), info(8, 8, alpha=True), M)
    assert plan.direct and plan.rgb_input


def test__plan__survives_the_plan_store():
    opts = V2UpscaleOptions(resize_mode=1, upscaling_resize_w=30, upscaling_resize_h=20, upscaling_crop=True,
                            upscaler_2="Lanczos", extras_upscaler_2_visibility=0.5)
    plan = plan_upscale(opts, info(10, 10), M)
    assert Plan.from_doc(json.loads(json.dumps(plan.to_doc()))) == plan


# --- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "body", "code"), [
    (400, b'{"reason": "SOMETHING_NEW"}', 1),
    (403, b"<html>forbidden</html>", 4),
    (418, b"", 1),
    (500, b"oops", -1),
    (502, b"<html>bad gateway</html>", 5),
    (504, b"", 9),
    (599, b"", -1),
    (403, b'{"code": 403, "reason": "BILLING_BALANCE_NOT_ENOUGH", "message": "x"}', 7),
])
def test__v3_error__maps_by_reason_then_status(status, body, code):
    err = from_v3_error(status, body, M.errors)
    assert err.code == code and err.upstream_status == status


# --- progress ---------------------------------------------------------------------------------

def result(status: str, **task) -> TaskResult:
    return TaskResult.model_validate({
        "extra": {"debug_info": {"submit_time_ms": "1000", "execute_time_ms": "2000", "complete_time_ms": "0"}},
        "task": {"task_id": "t", "status": status, **task},
    })


def test__progress__processing_estimates_from_elapsed_and_eta():
    data = progress_data(result("TASK_STATUS_PROCESSING", eta=3), M.task_status, now_ms=5000)
    assert data["status"] == 1 and data["progress"] == 0.5 and data["eta_relative"] == 3


@pytest.mark.parametrize("status", ["TASK_STATUS_UNKNOWN", "TASK_STATUS_SOMETHING_NEW"])
def test__progress__unknown_statuses_are_running(status):
    assert progress_data(result(status), M.task_status, now_ms=5000)["status"] == 1


# --- mappings ---------------------------------------------------------------------------------

def load_edited(tmp_path, name: str, old: str, new: str) -> str:
    """Load a copy of the tables with one edit; the error message it stops with."""
    folder = tmp_path / "m"
    shutil.copytree(mappings.default_dir(), folder)
    path = folder / f"{name}.toml"
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new))
    with pytest.raises(mappings.MappingsError) as e:
        mappings.load(folder)
    return str(e.value)


def test__mappings__unknown_v3_model_stops_the_boot(tmp_path):
    msg = load_edited(tmp_path, "upscalers", '"4x-UltraSharp"\nexact', '"8x-Imaginary"\nexact')
    assert "upscalers.toml" in msg and "v3_model" in msg


def test__mappings__unknown_v2_code_stops_the_boot(tmp_path):
    msg = load_edited(tmp_path, "errors", "TASK_NOT_FOUND = 3", "TASK_NOT_FOUND = 42")
    assert "errors.toml" in msg and "TASK_NOT_FOUND" in msg


def test__every_listed_upscaler__plans():
    for name, upscaler in M.upscalers.upscalers.items():
        plan = plan_upscale(V2UpscaleOptions(upscaler_1=name), info(32, 32), M)
        assert (plan.direct is not None) == (upscaler.v3_model is not None), name


# --- face restoration: the interface a real restorer plugs into ---------------------------------

class Posterize:
    """A stand-in restorer: deterministic, visible, and blended by visibility as V2 did."""

    available = True

    def __init__(self) -> None:
        self.calls: list[str] = []

    def restore(self, image, model, visibility, weight):
        from PIL import Image, ImageOps

        self.calls.append(model)
        return Image.blend(image, ImageOps.posterize(image, 2), visibility)


def test__face_steps__run_after_the_upscale_in_v2_order_when_a_restorer_is_available():
    from PIL import Image, ImageOps

    from proxy.compose.images import compose

    opts = V2UpscaleOptions(upscaler_1="Lanczos", upscaling_resize=2, gfpgan_visibility=0.5,
                            codeformer_visibility=0.25, codeformer_weight=0.7)
    source = encode(pattern(10, 8), "PNG")
    emulate = Policies(face="emulate")
    plan = plan_upscale(opts, info(10, 8), M, emulate, faces_available=True)
    assert [(f.model, f.visibility, f.weight) for f in plan.faces] == [("gfpgan", 0.5, None), ("codeformer", 0.25, 0.7)]
    restorer = Posterize()
    out = Image.open(io.BytesIO(compose(plan, source, [None], restorer)))
    assert restorer.calls == ["gfpgan", "codeformer"]
    upscaled = pattern(10, 8).resize((20, 16), Image.Resampling.LANCZOS)
    once = Image.blend(upscaled, ImageOps.posterize(upscaled, 2), 0.5)
    assert out.tobytes() == Image.blend(once, ImageOps.posterize(once, 2), 0.25).tobytes()
    assert plan_upscale(opts, info(10, 8), M, emulate).faces == ()  # no restorer: skipped, with a warning


def test__plan__approximating_away_a_crop_still_keeps_the_output_within_2048():
    opts = V2UpscaleOptions(resize_mode=1, upscaling_resize_w=2000, upscaling_resize_h=100, upscaling_crop=True,
                            upscaler_1="Lanczos")
    assert plan_upscale(opts, info(100, 200), M).output == (2000, 100)  # 2000 x 4000, cropped
    with pytest.raises(V2Error) as e:
        plan_upscale(opts, info(100, 200), M, Policies(crop="approximate"))
    assert e.value.code == 6 and "without the crop" in e.value.msg
