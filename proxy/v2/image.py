"""Check a base64 image and read its format and size from the header, without decoding pixels."""

from __future__ import annotations

import binascii
import io
import re
import struct
import warnings
from dataclasses import dataclass

import pybase64
from PIL import Image

from proxy.errors import V2Code, V2Error

# what V3 accepts (spec section 4)
V3_MAX_SIDE = 2048
V3_MAX_BYTES = 30 * 1024 * 1024
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
_CHUNK = 64 * 1024  # base64 characters decoded at a time: small buffers, no fresh pages
_WHITESPACE = re.compile(rb"\s")


@dataclass(frozen=True, slots=True)
class ImageInfo:
    format: str
    width: int
    height: int
    nbytes: int
    mode: str
    has_alpha: bool  # an alpha channel or a transparent colour: V2 dropped it (converted to RGB)
    orientation: int = 1  # EXIF orientation (1: upright), which A1111 applied from v1.9


def _bad(msg: str) -> V2Error:
    return V2Error(V2Code.PARAM_RANGE_OUT_OF_LIMIT, f"image: {msg}")


def probe(text: memoryview | bytes, head: bytes | None = None) -> tuple[ImageInfo, memoryview | bytes]:
    """(what the image is, the base64 text to forward) or a V2Error with code 6.

    The text is validated whole with a fast decoder, a chunk at a time; only the first chunk is
    kept, for the header. Line breaks and missing padding, which lenient V2 decoders accepted,
    are repaired (that path copies the text). `head`: the text's first chunk, decoded, from a
    caller that has validated the whole text already (`validate_base64`): it isn't decoded again.
    """
    if not len(text):
        raise _bad("is empty")
    if head is None:
        head = validate_base64(text)
    if head is None:
        text = _repair(text)
        head = validate_base64(text)
        if head is None:
            raise _bad("is not valid base64")
    nbytes = len(text) // 4 * 3 - (text[-2:] == b"==") - (text[-1:] == b"=")
    if nbytes > V3_MAX_BYTES:
        raise _bad(f"is {nbytes} bytes, over the {V3_MAX_BYTES} bytes V3 accepts")
    info = _header(head, nbytes) or (len(head) < nbytes and _header(pybase64.b64decode(text), nbytes))
    if not info:
        raise _bad(f"is not an image in a supported format ({', '.join(FORMATS)})")
    if info.width > V3_MAX_SIDE or info.height > V3_MAX_SIDE:
        raise _bad(f"is {info.width}x{info.height}, over the {V3_MAX_SIDE}x{V3_MAX_SIDE} V3 accepts")
    if why := _cut_short(info.format, text, head, nbytes):
        raise _bad(f"is cut short: {why}")
    return info, text


def validate_base64(text: memoryview | bytes) -> bytes | None:
    """The decoded first chunk if the whole text is valid, padded base64; else None."""
    if len(text) % 4:
        return None
    head = b""
    last = len(text) - _CHUNK
    try:
        for at in range(0, len(text), _CHUNK):
            chunk = text[at:at + _CHUNK]
            if at < last and chunk[-1] == ord("="):  # padding only at the very end
                return None
            decoded = pybase64.b64decode(chunk, validate=True)
            if not at:
                head = decoded
    except (binascii.Error, ValueError):
        return None
    return head


def _decoded(text: memoryview | bytes, at: int, n: int) -> bytes:
    """Bytes `at`..`at + n` of what valid base64 text decodes to, decoding only the groups holding them."""
    first = at // 3 * 4
    return pybase64.b64decode(text[first:(at + n + 2) // 3 * 4])[at % 3:at % 3 + n]


def _repair(text: memoryview | bytes) -> bytes:
    cleaned = _WHITESPACE.sub(b"", bytes(text))
    return cleaned + b"=" * (-len(cleaned) % 4)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
_PNG_MODES = {0: "L", 2: "RGB", 3: "P", 4: "LA", 6: "RGBA"}
_ORIENTATION = 0x0112  # the EXIF tag
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


def _header(data: bytes, nbytes: int) -> ImageInfo | None:
    # PNG, by far the most common input, from its fixed-layout header: a third of the cost of a
    # small submission went to Pillow's open() here. Everything else goes through Pillow.
    return _png_header(data, nbytes) or _pillow_header(data, nbytes)


def _png_header(data: bytes, nbytes: int) -> ImageInfo | None:
    if data[:16] != _PNG_SIGNATURE or len(data) < 26 or data[25] not in _PNG_MODES:
        return None
    width, height = struct.unpack(">II", data[16:24])
    transparent = _png_chunk_before_pixels(data, b"tRNS")
    if not width or not height or transparent is None or _png_chunk_before_pixels(data, b"eXIf"):
        return None  # an eXIf chunk may turn the image: Pillow reads it
    mode = _PNG_MODES[data[25]]
    return ImageInfo("PNG", width, height, nbytes, mode, mode in _ALPHA_MODES or transparent)


def _png_chunk_before_pixels(data: bytes, kind: bytes) -> bool | None:
    """Whether a chunk of this kind comes before the first IDAT; None if `data` ends first."""
    at = 8
    while at + 8 <= len(data):
        length, name = struct.unpack(">I4s", data[at:at + 8])
        if name == kind:
            return True
        if name == b"IDAT":
            return False
        at += 12 + length
    return None


# The ends that containers declare, checked without decoding pixels: an image whose data stops
# short fails V3 and the composer alike, so it is refused here where that is certain. (A JPEG or a
# GIF with no end marker often decodes whole, and what follows the end marker may be anything.)
_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_MAX_PNG_CHUNKS = 4096  # chunks walked before giving up (a PNG of 8 KiB IDATs at 30 MB has ~3700)


def _cut_short(fmt: str, text: memoryview | bytes, head: bytes, nbytes: int) -> str | None:
    """How the data ends before the image does, where its container tells; else None."""
    if fmt == "PNG":
        return _png_cut_short(text, nbytes)
    if fmt == "WEBP" and head[:4] == b"RIFF":
        declared = int.from_bytes(head[4:8], "little") + 8
        if nbytes < declared:
            return f"{nbytes} of the {declared} bytes its RIFF header declares"
    return None


def _png_cut_short(text: memoryview | bytes, nbytes: int) -> str | None:
    if nbytes >= 20 and _decoded(text, nbytes - 12, 12) == _IEND:
        return None  # ends as a PNG ends
    at, pixels = 8, False
    for _ in range(_MAX_PNG_CHUNKS):
        if at == nbytes:  # after whole chunks: pixels all there but for the IEND chunk, or not
            return None if pixels else "a PNG with no pixel data (IDAT)"
        if at + 8 > nbytes:
            return None if pixels else "the PNG ends inside a chunk header, before any pixel data"
        length, kind = struct.unpack(">I4s", _decoded(text, at, 8))
        if kind == b"IEND" or (pixels and kind != b"IDAT"):
            return None  # the pixel data is whole
        pixels = pixels or kind == b"IDAT"
        at += 12 + length
        if at > nbytes:
            return f"the PNG ends inside its {kind.decode('latin-1')!r} chunk"
    return None


def _pillow_header(data: bytes, nbytes: int) -> ImageInfo | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as im:
                alpha = im.mode in _ALPHA_MODES or "transparency" in im.info
                orientation = im.getexif().get(_ORIENTATION, 1)
                return ImageInfo(im.format or "", im.width, im.height, nbytes, im.mode, alpha,
                                 orientation if orientation in range(1, 9) else 1)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
