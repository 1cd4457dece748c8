"""Parse a V2 upscale body without materialising the image string again.

A 4 MB body parsed whole costs milliseconds, mostly in copying the image string (perfkit).
The common body is plain JSON whose `image` value is plain base64: find that value's byte span,
parse everything else (a few hundred bytes) with orjson, and keep the image as a view of the
request body. The fast path never changes what a body means: it answers only when it has proved
that a full parse (orjson) would give the same fields and the same image, and otherwise takes the
full parse.

The proof: the span holds only base64 characters (after a clean `data:` prefix), so it was a
whole JSON string with no escapes or control characters; it is swapped for the string "\\x00",
whose only JSON spelling is `"\\u0000"`. If the rest of the body holds that spelling once (ours)
and parses to an object whose `image` is "\\x00", the swapped string was the top-level `image`
that a full parse keeps (the last one: orjson keeps the last of duplicated keys).
"""

from __future__ import annotations

import re

import orjson

from proxy.errors import V2Code, V2Error
from proxy.v2.image import validate_base64

_KEY = b'"image"'
_COLON_QUOTE = re.compile(rb'[ \t\r\n]*:[ \t\r\n]*"')  # after a key: its value, if a string
_DATA_URI_MAX = 100  # `data:image/...;base64,` prefixes are short
_SENTINEL = b'"\\u0000"'  # the string "\x00": no other spelling in JSON
_SENTINEL_VALUE = "\x00"
# bounds on the work before the full parse: `"image"` strings looked at, and `image` keys tried
# (each try parses the rest of the body)
_MAX_SEEN, _MAX_TRIES = 16, 3
_BASE64 = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


def split_image(body: bytes) -> tuple[dict, memoryview | bytes, bytes | None]:
    """(the other fields as a dict, the image's base64 text, and the first chunk it decodes to when
    the fast path found it valid base64 as a whole: `probe` then needn't decode it all again) of a
    V2 upscale body."""
    found = _fast_split(body)
    if found is not None:
        return found
    doc, image = _full_parse(body)
    return doc, _strip_data_uri(image), None


def _fast_split(body: bytes) -> tuple[dict, memoryview, bytes | None] | None:
    spans = []  # each `"image": "<plain base64>"`, wherever it is
    at = body.find(_KEY)
    for _ in range(_MAX_SEEN):
        if at == -1:
            break
        value = _COLON_QUOTE.match(body, at + len(_KEY))
        if value is not None and (end := body.find(b'"', value.end())) != -1:
            plain, head = _plain(memoryview(body)[value.end():end])
            if plain:
                spans.append((value.end(), end, head))
            at = end
        at = body.find(_KEY, at + 1)
    # the longest first: it is the image, most likely, and what is left to parse is then short
    for start, end, head in sorted(spans, key=lambda span: span[0] - span[1])[:_MAX_TRIES]:
        doc = _parse_rest(body[:start - 1] + _SENTINEL + body[end + 1:])
        if doc is not None:
            doc["image"] = ""
            return doc, _strip_data_uri(memoryview(body)[start:end]), head
    return None


def _parse_rest(rest: bytes) -> dict | None:
    """The body with the sentinel for one `image` value, parsed, if that value is the one a full
    parse keeps; else None."""
    if rest.count(_SENTINEL[1:-1]) != 1:
        return None  # `\u0000` elsewhere: the proof does not hold
    try:
        doc = orjson.loads(rest)
    except orjson.JSONDecodeError:
        return None  # not JSON: the full parse reports it, with the right position
    if isinstance(doc, dict) and doc.get("image") == _SENTINEL_VALUE:
        return doc
    return None


def _plain(image: memoryview) -> tuple[bool, bytes | None]:
    """(whether the text is base64 characters only, after a `data:` prefix of printable ASCII;
    the first chunk it decodes to if it is valid base64 as a whole). One pass over a valid image:
    the check `probe` would make is the proof here."""
    if image[:5] == b"data:":
        comma = bytes(image[:_DATA_URI_MAX]).find(b",")
        if comma == -1:
            return False, None
        if not all(0x20 <= c < 0x7F and c != ord("\\") for c in image[:comma]):
            return False, None
        image = image[comma + 1:]
    if (head := validate_base64(image)) is not None:
        return True, head
    # not valid as a whole (no padding, say: probe repairs that): base64 characters, at least?
    whole = len(image) - len(image) % 4
    return validate_base64(image[:whole]) is not None and all(c in _BASE64 for c in image[whole:]), None


def _full_parse(body: bytes) -> tuple[dict, bytes]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise V2Error(V2Code.INVALID_JSON, f"body is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise V2Error(V2Code.INVALID_JSON, "body must be a JSON object")
    image = doc.get("image")
    if image is None:
        raise V2Error(V2Code.INVALID_JSON, "image: field required (base64 of the input image)")
    if not isinstance(image, str):
        raise V2Error(V2Code.INVALID_JSON, "image: must be a base64 string")
    try:
        return doc, image.encode("ascii")
    except UnicodeEncodeError:
        raise V2Error(V2Code.PARAM_RANGE_OUT_OF_LIMIT, "image: is not valid base64") from None


def _strip_data_uri(image: memoryview | bytes) -> memoryview | bytes:
    if image[:5] != b"data:":
        return image
    comma = bytes(image[:_DATA_URI_MAX]).find(b",")
    if comma == -1 or not bytes(image[:comma]).endswith(b";base64"):
        raise V2Error(V2Code.PARAM_RANGE_OUT_OF_LIMIT, "image: a data URI must be `data:image/...;base64,...`")
    return image[comma + 1:]
