"""Parse a V2 upscale body without materialising the image string again.

A 4 MB body parsed whole costs milliseconds, mostly in copying the image string (perfkit).
The common body is plain JSON whose `image` value has no escapes: find that value's byte span,
parse everything else (a few hundred bytes) with orjson, and keep the image as a view of the
request body. Anything unusual (escaped characters, a nested or duplicated `image` key) takes the
plain full parse, so the fast path never changes what a body means.
"""

from __future__ import annotations

import orjson

from proxy.errors import V2Code, V2Error

_KEY = b'"image"'
_WS = b" \t\r\n"
_DATA_URI_MAX = 100  # `data:image/...;base64,` prefixes are short


def split_image(body: bytes) -> tuple[dict, memoryview | bytes]:
    """(the other fields as a dict, the image's base64 text) of a V2 upscale body."""
    found = _fast_split(body)
    if found is None:
        found = _full_parse(body)
    doc, image = found
    return doc, _strip_data_uri(image)


def _fast_split(body: bytes) -> tuple[dict, memoryview] | None:
    at = body.find(_KEY)
    while at != -1:
        i = _skip_ws(body, at + len(_KEY))
        if i < len(body) and body[i] == ord(":"):
            i = _skip_ws(body, i + 1)
            if i >= len(body) or body[i] != ord('"'):
                return None  # `image` is not a string: let the full parse report it
            start = i + 1
            end = body.find(b'"', start)
            if end == -1 or body.find(b"\\", start, end) != -1:
                return None
            try:
                doc = orjson.loads(body[:start] + body[end:])  # the image value becomes ""
            except orjson.JSONDecodeError:
                return None
            # the span was the top-level `image` only if that is now the empty string
            if isinstance(doc, dict) and doc.get("image") == "":
                return doc, memoryview(body)[start:end]
            return None
        at = body.find(_KEY, at + 1)
    return None


def _skip_ws(body: bytes, i: int) -> int:
    while i < len(body) and body[i] in _WS:
        i += 1
    return i


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
