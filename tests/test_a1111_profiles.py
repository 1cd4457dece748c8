"""Each A1111 release line, through the proxy, against the oracle in tests/a1111.py: pixel for
pixel (and the PNG colour key) wherever the proxy emulates, in size on the AI paths under the
default `native_scale` policy (one V3 job at the factor)."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from proxy.compose.task import is_composed_id
from tests.a1111 import A1111, RELEASES, A1111Failed, native_pass_on
from tests.helpers import run_v2, upscale
from tests.images import encode, pattern

LINES = list(RELEASES)


def rgb_with_colour_key(w: int, h: int) -> bytes:
    im = pattern(w, h)
    return encode(im, "PNG", transparency=im.getpixel((0, 0)))  # a tRNS chunk: one RGB colour


def palette_with_alpha(w: int, h: int) -> bytes:
    im = pattern(w, h).quantize(16)
    im.info["transparency"] = bytes(range(0, 256, 16))  # a tRNS chunk: one alpha per entry
    return encode(im, "PNG")


def rotated_jpeg(w: int, h: int, orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(pattern(w, h), "JPEG", exif=exif.tobytes(), quality=95)


PNG = lambda w, h, mode="RGB": encode(pattern(w, h, mode), "PNG")  # noqa: E731

CASES = {
    "lanczos, not a multiple of 8": (PNG(31, 17), {"upscaler_1": "Lanczos", "upscaling_resize": 3.3}),
    "nearest": (PNG(31, 17), {"upscaler_1": "Nearest", "upscaling_resize": 2}),
    "nearest shrinking": (PNG(31, 17), {"upscaler_1": "Nearest", "upscaling_resize": 0.6}),
    "lanczos at exactly 1": (PNG(31, 17), {"upscaler_1": "Lanczos", "upscaling_resize": 1}),
    "model at exactly 1": (PNG(33, 21), {"upscaler_1": "R-ESRGAN 4x+", "upscaling_resize": 1}),
    "model shrinking": (PNG(33, 21), {"upscaler_1": "R-ESRGAN 4x+", "upscaling_resize": 0.5}),
    "model at 2.5": (PNG(30, 22), {"upscaler_1": "4x-UltraSharp", "upscaling_resize": 2.5}),
    "model at 6: two passes": (PNG(17, 11), {"upscaler_1": "R-ESRGAN 4x+ Anime6B", "upscaling_resize": 6}),
    "model at 20: three passes": (PNG(5, 3), {"upscaler_1": "4x-UltraSharp", "upscaling_resize": 20}),
    "scale to, crop": (PNG(64, 48), {"resize_mode": 1, "upscaling_resize_w": 200, "upscaling_resize_h": 200,
                                     "upscaling_crop": True, "upscaler_1": "R-ESRGAN 4x+ Anime6B"}),
    "scale to, no crop": (PNG(30, 30), {"resize_mode": 1, "upscaling_resize_w": 100, "upscaling_resize_h": 100,
                                        "upscaling_crop": False, "upscaler_1": "Lanczos"}),
    "crop with black bars from 1.4": (PNG(30, 30), {"resize_mode": 1, "upscaling_resize_w": 100,
                                                     "upscaling_resize_h": 100, "upscaling_crop": True,
                                                     "upscaler_1": "Nearest"}),
    "blend, model first": (PNG(40, 30), {"upscaling_resize": 2.5, "upscaler_1": "R-ESRGAN 4x+ Anime6B",
                                          "upscaler_2": "Lanczos", "extras_upscaler_2_visibility": 0.35}),
    "rgba, lanczos": (PNG(23, 19, "RGBA"), {"upscaler_1": "Lanczos", "upscaling_resize": 2}),
    "rgba, blend lanczos first": (PNG(23, 19, "RGBA"), {"upscaler_1": "Lanczos", "upscaling_resize": 2,
                                                        "upscaler_2": "4x-UltraSharp",
                                                        "extras_upscaler_2_visibility": 0.5}),
    "rgba, model and crop": (PNG(23, 19, "RGBA"), {"resize_mode": 1, "upscaling_resize_w": 50,
                                                   "upscaling_resize_h": 40, "upscaling_crop": True,
                                                   "upscaler_1": "R-ESRGAN 4x+ Anime6B"}),
    "palette": (PNG(23, 19, "P"), {"upscaler_1": "Nearest", "upscaling_resize": 2}),
    "palette with alpha": (palette_with_alpha(23, 19), {"upscaler_1": "Lanczos", "upscaling_resize": 2}),
    "rgb colour key, lanczos": (rgb_with_colour_key(24, 16), {"upscaler_1": "Lanczos", "upscaling_resize": 2}),
    "rgb colour key, model": (rgb_with_colour_key(24, 16), {"upscaler_1": "4x-UltraSharp",
                                                            "upscaling_resize": 4}),
    "exif-rotated jpeg, lanczos": (rotated_jpeg(30, 20), {"upscaler_1": "Lanczos", "upscaling_resize": 2}),
    "exif-rotated jpeg, model": (rotated_jpeg(30, 20, 8), {"upscaler_1": "R-ESRGAN 4x+ Anime6B",
                                                           "upscaling_resize": 2}),
    "none ignores crop and blend": (PNG(31, 17), {"resize_mode": 1, "upscaling_resize_w": 64,
                                                  "upscaling_resize_h": 64, "upscaling_crop": True,
                                                  "upscaler_1": "None", "upscaler_2": "Lanczos",
                                                  "extras_upscaler_2_visibility": 0.5}),
}
AI_CASES = [name for name, (_, body) in CASES.items()
            if body.get("upscaler_1") not in ("Lanczos", "Nearest", "None")]


@pytest.fixture
async def emulator_url(start_emulator) -> str:
    server, _ = await start_emulator(queue_delay=0, process_delay=0)
    return str(server.make_url(""))


def assert_same_image(actual: Image.Image, expected: Image.Image) -> None:
    assert (actual.mode, actual.size) == (expected.mode, expected.size)
    assert actual.tobytes() == expected.tobytes()
    assert actual.info.get("transparency") == expected.info.get("transparency")


@pytest.mark.parametrize("line", LINES)
@pytest.mark.parametrize("case", list(CASES))
async def test__each_release_line__matches_a1111_pixel_for_pixel(emulator_url, start_proxy, line, case):
    data, body = CASES[case]
    proxy = await start_proxy(emulator_url, a1111_profile=line, policy_native_scale="emulate")
    try:
        expected = await A1111(line, native_pass_on(emulator_url)).extras(data, body)
    except A1111Failed:  # A1111 answered HTTP 500; the proxy answers with the image, without the key
        reply, image = await run_v2(proxy, data, body)
        assert "transparency" not in image.info
        return
    reply, image = await run_v2(proxy, data, body)
    assert_same_image(image, expected)


@pytest.mark.parametrize("line", LINES)
@pytest.mark.parametrize("case", AI_CASES)
async def test__default_policy__one_v3_job_at_the_factor_gives_a1111s_size(emulator_url, start_proxy, line, case):
    data, body = CASES[case]
    proxy = await start_proxy(emulator_url, a1111_profile=line)
    try:
        expected = await A1111(line, native_pass_on(emulator_url)).extras(data, body)
    except A1111Failed:
        return
    _, image = await run_v2(proxy, data, body)
    assert image.size == expected.size


@pytest.mark.parametrize(("line", "direct"), [("v1.3", True), ("v1.6", False), ("v1.10", False)])
async def test__size_v3_cannot_give__composes_only_where_the_release_rounds(emulator_url, start_proxy, line, direct):
    proxy = await start_proxy(emulator_url, a1111_profile=line)
    reply, image = await run_v2(proxy, PNG(30, 22), {"upscaler_1": "4x-UltraSharp", "upscaling_resize": 2})
    assert is_composed_id(reply["data"]["task_id"]) != direct
    assert image.size == ((60, 44) if direct else (56, 40))


@pytest.mark.parametrize("line", ["v1.6", "v1.8", "v1.9", "v1.9.4", "v1.10"])
async def test__side_rounding_to_0__is_code_6_saying_why(emulator_url, start_proxy, line):
    proxy = await start_proxy(emulator_url, a1111_profile=line)
    reply = await upscale(proxy, {"image": base64.b64encode(PNG(40, 3)).decode(), "upscaler_1": "Lanczos",
                                  "upscaling_resize": 2})
    assert reply["code"] == 6 and "round to 80x0" in reply["msg"], reply


async def test__v1_3__keeps_a_side_that_later_lines_round_to_0(emulator_url, start_proxy):
    proxy = await start_proxy(emulator_url, a1111_profile="v1.3")
    _, image = await run_v2(proxy, PNG(40, 3), {"upscaler_1": "Lanczos", "upscaling_resize": 2})
    assert image.size == (80, 6)


async def test__colour_keyed_png__reaches_v3_as_pixels_only_and_comes_back_with_its_key(emulator_url, start_proxy):
    """A tRNS colour key sent to V3 would make it treat those pixels as transparent (they came out
    black): the model gets RGB pixels only, and the result carries the key, as V2's did."""
    proxy = await start_proxy(emulator_url)
    im = pattern(24, 16)
    key = im.getpixel((3, 5))
    _, image = await run_v2(proxy, encode(im, "PNG", transparency=key),
                            {"upscaler_1": "4x-UltraSharp", "upscaling_resize": 4})
    assert image.mode == "RGB" and image.info["transparency"] == key
    assert image.getpixel((3 * 4 + 1, 5 * 4 + 1)) != (0, 0, 0)


def test__palette_with_alpha_fixture__really_has_per_entry_alpha():
    im = Image.open(io.BytesIO(palette_with_alpha(8, 8)))
    assert im.mode == "P" and isinstance(im.info["transparency"], bytes)


async def test__the_cases__tell_every_release_line_from_the_one_before(emulator_url):
    """A mistake in one line's rules would show: each line differs from its predecessor on some case."""
    results: dict[str, dict[str, tuple]] = {}
    for line in LINES:
        oracle = A1111(line, native_pass_on(emulator_url))
        results[line] = {}
        for case, (data, body) in CASES.items():
            try:
                image = await oracle.extras(data, body)
                results[line][case] = (image.mode, image.size, image.tobytes(), image.info.get("transparency"))
            except A1111Failed:
                results[line][case] = ("failed",)
    for before, after in zip(LINES, LINES[1:]):
        assert any(results[before][c] != results[after][c] for c in CASES), (before, after)
