"""`probe`: what a base64 image is (format, size, mode, transparency, EXIF orientation), from its header."""

import base64

import pybase64
import pytest

from proxy.errors import V2Error
from proxy.v2.image import V3_MAX_BYTES, probe
from tests.images import encode, pattern

ORIENTATION = 0x0112


def b64_of(raw: bytes) -> bytes:
    return base64.b64encode(raw)


def with_orientation(width: int, height: int, orientation: int):
    im = pattern(width, height)
    exif = im.getexif()
    exif[ORIENTATION] = orientation
    return im, exif.tobytes()


@pytest.mark.parametrize(("fmt", "mode"), [("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "P"),
                                           ("JPEG", "RGB"), ("WEBP", "RGB"), ("BMP", "RGB"), ("GIF", "P"),
                                           ("TIFF", "RGB")])
def test__probe__reads_format_and_size(fmt, mode):
    raw = encode(pattern(37, 23, mode), fmt)
    info, text = probe(b64_of(raw))
    assert (info.format, info.width, info.height, info.nbytes) == (fmt, 37, 23, len(raw))
    assert info.orientation == 1 and bytes(text) == b64_of(raw)


@pytest.mark.parametrize(("mode", "save", "has_alpha"), [
    ("RGB", {}, False),
    ("RGBA", {}, True),
    ("P", {}, False),
    ("RGB", {"transparency": (0, 0, 0)}, True),  # a tRNS colour key
    ("P", {"transparency": 0}, True),  # a tRNS palette entry
])
def test__probe__png_alpha_and_trns_colour_key__are_has_alpha(mode, save, has_alpha):
    raw = encode(pattern(20, 10, mode), "PNG", **save)
    assert (b"tRNS" in raw) == ("transparency" in save)
    info, _ = probe(b64_of(raw))
    assert (info.mode, info.has_alpha) == (mode, has_alpha)


def test__probe__grey_png_with_a_colour_key__is_has_alpha():
    raw = encode(pattern(20, 10).convert("L"), "PNG", transparency=0)
    info, _ = probe(b64_of(raw))
    assert (info.format, info.mode, info.has_alpha) == ("PNG", "L", True)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test__probe__jpeg_exif_orientation__is_read_with_the_stored_size(orientation):
    im, exif = with_orientation(40, 30, orientation)
    raw = encode(im, "JPEG", exif=exif)
    info, _ = probe(b64_of(raw))
    assert (info.format, info.width, info.height, info.orientation) == ("JPEG", 40, 30, orientation)


def test__probe__png_with_an_exif_chunk__reads_its_orientation():
    im, exif = with_orientation(40, 30, 6)
    raw = encode(im, "PNG", exif=exif)
    assert b"eXIf" in raw
    info, _ = probe(b64_of(raw))
    assert (info.format, info.width, info.height, info.orientation) == ("PNG", 40, 30, 6)


def test__probe__an_orientation_outside_1_to_8__is_upright():
    im, exif = with_orientation(40, 30, 9)
    info, _ = probe(b64_of(encode(im, "JPEG", exif=exif)))
    assert info.orientation == 1


def test__probe__finds_a_jpeg_header_behind_a_large_exif_block():
    im = pattern(40, 30)
    exif = im.getexif()
    exif[0x010E] = "x" * 60000  # ImageDescription: pushes the frame header past the first chunk
    exif[ORIENTATION] = 5
    raw = encode(im, "JPEG", exif=exif.tobytes())
    info, _ = probe(b64_of(raw))
    assert (info.format, info.width, info.height, info.orientation) == ("JPEG", 40, 30, 5)


def test__probe__repairs_line_breaks_and_missing_padding():
    raw = encode(pattern(31, 17), "PNG")
    clean = b64_of(raw)
    assert clean.endswith(b"=")
    wrapped = b"\n".join(clean[i:i + 76] for i in range(0, len(clean), 76)).rstrip(b"=")
    info, text = probe(wrapped)
    assert (info.width, info.height, info.nbytes) == (31, 17, len(raw))
    assert bytes(text) == clean


def test__probe__rejects_padding_inside_the_text():
    first = b64_of(encode(pattern(300, 300), "PNG"))
    broken = first[:64 * 1024 - 1] + b"=" + first[64 * 1024:]
    with pytest.raises(V2Error) as e:
        probe(broken)
    assert e.value.code == 6 and "not valid base64" in e.value.msg


@pytest.mark.parametrize(("text", "words"), [
    (b"", "is empty"),
    (b"not base64 at all!", "not valid base64"),
    (b64_of(b"hello world"), "not an image"),
    (b64_of(encode(pattern(8, 8), "ICO")), "not an image in a supported format"),
    (b64_of(encode(pattern(2049, 2), "PNG")), "2049x2"),
    (b64_of(encode(pattern(2, 2049), "JPEG")), "2x2049"),
])
def test__probe__what_v3_would_refuse__is_code_6_saying_why(text, words):
    with pytest.raises(V2Error) as e:
        probe(text)
    assert e.value.code == 6 and e.value.msg.startswith("image: ") and words in e.value.msg


def test__probe__over_30_mb__is_code_6_before_the_header_is_read():
    text = pybase64.b64encode(b"\0" * (V3_MAX_BYTES + 3))
    with pytest.raises(V2Error) as e:
        probe(text)
    assert e.value.code == 6 and f"{V3_MAX_BYTES + 3} bytes" in e.value.msg
