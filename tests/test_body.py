"""The V2 body as bytes (`split_image`) and the V3 body written around the client's image (`UpscaleBody`)."""

import base64
import json

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.errors import V2Code, V2Error
from proxy.v2.body import _fast_split, split_image
from proxy.v2.image import validate_base64
from proxy.v3.payload import JOIN_BELOW, UpscaleBody

# --- split_image --------------------------------------------------------------------------------


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
    doc, image, _ = split_image(raw)
    full = json.loads(raw)
    assert bytes(image) == full["image"].encode()
    without_image = {k: v for k, v in full.items() if k != "image"}
    assert {k: v for k, v in doc.items() if k != "image"} == without_image


def test__split_image__unescapes_json_escapes():
    _, image, _ = split_image(b'{"image": "ab\\/cd"}')
    assert bytes(image) == b"ab/cd"


def test__split_image__fast_path_keeps_a_view_of_the_body():
    raw = b'{"image": "' + b"A" * 1000 + b'"}'
    _, image, _ = split_image(raw)
    assert isinstance(image, memoryview) and image.obj is raw


def test__split_image__strips_a_data_uri():
    _, image, _ = split_image(b'{"image": "data:image/jpeg;base64,QUJD"}')
    assert bytes(image) == b"QUJD"


@pytest.mark.parametrize(("raw", "code", "words"), [
    (b'{"image": "QUJD"', 1, "not valid JSON"),
    (b'["image", "QUJD"]', 1, "JSON object"),
    (b'{"upscaling_resize": 2}', 1, "image: field required"),
    (b'{"image": 42}', 1, "image: must be a base64 string"),
    (b'{"image": "\\u00e9QUJD"}', 6, "not valid base64"),
    (b'{"image": "data:image/png,QUJD"}', 6, "data URI"),
])
def test__split_image__a_body_it_cannot_use__is_a_v2_error_naming_why(raw, code, words):
    with pytest.raises(V2Error) as e:
        split_image(raw)
    assert e.value.code == code and words in e.value.msg


def test__split_image__a_nested_image_before_an_empty_top_level_one__is_the_empty_one():
    _, image, _ = split_image(b'{"x": {"image": "QUJD"}, "image": ""}')
    assert bytes(image) == b""


def test__split_image__duplicate_image_keys__the_last_one_wins_as_in_orjson():
    assert orjson.loads(b'{"image": "QUJD", "image": ""}') == {"image": ""}
    _, image, _ = split_image(b'{"image": "QUJD", "image": ""}')
    assert bytes(image) == b""


def test__split_image__an_image_key_ending_an_escaped_key__is_not_the_image():
    _, image, _ = split_image(b'{"\\"image": "QUJD", "image": "QQ=="}')
    assert bytes(image) == b"QQ=="


@pytest.mark.parametrize("raw", [b"\n", b"\r", b"\t", b"\x00", b"\x1f"])
def test__split_image__a_raw_control_character_in_the_image__is_not_json_as_in_a_full_parse(raw):
    with pytest.raises(V2Error) as e:
        split_image(b'{"image": "QU' + raw + b'JD", "upscaling_resize": 2}')
    assert e.value.code == V2Code.INVALID_JSON and "not valid JSON" in e.value.msg


def test__split_image__invalid_utf8_in_the_image__is_not_json_as_in_a_full_parse():
    with pytest.raises(V2Error) as e:
        split_image(b'{"image": "QU\xffJD"}')
    assert e.value.code == V2Code.INVALID_JSON


@pytest.mark.parametrize("raw", [
    b'{"image": "QUJD", "upscaling_resize": 2}',
    b'{"upscaler_1": "image", "meta": {"image": "QQ=="}, "image": "QUJD"}',
    b'{"image": "QQ==", "image": "QUJD"}',
    b'{"image": "data:image/png;base64,QUJD"}',
    b'{"image": "QUJ"}',  # unpadded: the probe repairs it
])
def test__split_image__plain_bodies__take_the_fast_path(raw):
    assert _fast_split(raw) is not None


# --- split_image means what orjson means: property-based ----------------------------------------

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
WS = st.sampled_from([b"", b"", b" ", b"\n", b"\t", b"\r\n  "])
B64_RUN = st.text(B64, min_size=1, max_size=12).map(str.encode)
VALID_PIECE = st.one_of(
    B64_RUN, B64_RUN, B64_RUN,
    st.sampled_from([b'\\"', b"\\\\", b"\\/", b"\\n", b"\\u0000", b"\\u0069", b"\\ud83d\\ude00", b" ", b"\x7f",
                     b"data:image/png;base64,", b"data:image/png,", b"data:", b"image", b'\\"image\\": \\"']),
    st.text(st.characters(codec="utf-8", min_codepoint=0x20), min_size=1, max_size=3).map(str.encode),
)
BROKEN_PIECE = st.sampled_from([b"\\ud800", b"\\udc00", b"\\x", b"\\", b"\\u12", b"\n", b"\t", b"\x00", b"\x1f",
                                b"\xff", b"\xc3", b"\xed\xa0\x80", b'"'])


def _string(pieces: list[bytes]) -> bytes:
    return b'"' + b"".join(pieces) + b'"'


PLAIN_STRING = st.lists(B64_RUN, max_size=4).map(_string)
ANY_STRING = st.lists(VALID_PIECE, max_size=5).map(_string)
BROKEN_STRING = st.tuples(st.lists(VALID_PIECE, max_size=3), BROKEN_PIECE, st.lists(VALID_PIECE, max_size=3)).map(
    lambda t: _string([*t[0], t[1], *t[2]]))
DATA_URI = st.lists(B64_RUN, max_size=3).map(lambda parts: b'"data:image/png;base64,' + b"".join(parts) + b'"')
KEY = st.one_of(
    st.sampled_from([b'"image"', b'"image"', b'"\\u0069mage"', b'"\\"image"', b'"imagex"', b'"upscaler_1"',
                     b'"upscaling_resize"', b'"x"']),
    ANY_STRING,
)
NUMBER = st.one_of(
    st.integers(-(2**70), 2**70).map(lambda n: str(n).encode()),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: repr(f).encode()),
    st.sampled_from([b"1e308", b"-0", b"2", b"0.5e-3"]),
)
LEAF = st.one_of(NUMBER, PLAIN_STRING, ANY_STRING, DATA_URI, st.sampled_from([b"true", b"false", b"null"]))
BROKEN = st.one_of(BROKEN_STRING, st.sampled_from([b"1e400", b"-1e400", b"NaN", b"Infinity", b"01", b"1.", b".5",
                                                   b"tru", b"[", b"}"]))


@st.composite
def _container(draw, values) -> bytes:
    ws = draw(WS)
    if draw(st.booleans()):
        return b"[" + b",".join(ws + v for v in draw(st.lists(values, max_size=3))) + b"]"
    members = draw(st.lists(st.tuples(KEY, values), max_size=3))
    return b"{" + b",".join(ws + k + ws + b":" + v for k, v in members) + b"}"


VALUE = st.recursive(LEAF, _container, max_leaves=6)
IMAGE_VALUE = st.one_of(PLAIN_STRING, PLAIN_STRING, PLAIN_STRING, DATA_URI, ANY_STRING, VALUE)


@st.composite
def v2_bodies(draw) -> bytes:
    """V2-like bodies: top-level and nested `image` keys, duplicates, escapes, whitespace, unicode;
    a quarter with one broken token (a control character, a lone surrogate, bytes that are not UTF-8,
    NaN...), a tenth cut short or with a stray byte."""
    members = draw(st.lists(st.tuples(KEY, VALUE), max_size=3))
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 0]))):  # the top-level image, maybe twice
        members.insert(draw(st.integers(0, len(members))), (b'"image"', draw(IMAGE_VALUE)))
    if members and draw(st.sampled_from([False, False, False, True])):
        at = draw(st.integers(0, len(members) - 1))
        members[at] = (members[at][0], draw(BROKEN))
    ws = draw(WS)
    body = b"{" + ws + b",".join(k + ws + b":" + v for k, v in members) + ws + b"}"
    body = draw(st.sampled_from([body] * 12 + [b"[" + body + b"]", b"", b"null"]))
    cut = draw(st.sampled_from(["none"] * 8 + ["cut", "byte"]))
    if cut != "none" and body:
        at = draw(st.integers(0, len(body) - 1))
        body = body[:at] if cut == "cut" else body[:at] + draw(st.binary(min_size=1, max_size=1)) + body[at:]
    return body


def full_parse_meaning(body: bytes) -> tuple[dict, bytes] | V2Code:
    """What a body means by a full orjson parse: (the other fields, the top-level image's base64 text
    after any data URI prefix), or the V2 code it is refused with."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return V2Code.INVALID_JSON
    if not isinstance(doc, dict) or not isinstance(doc.get("image"), str):
        return V2Code.INVALID_JSON
    image = doc.pop("image")
    if not image.isascii():
        return V2Code.PARAM_RANGE_OUT_OF_LIMIT
    if image.startswith("data:"):
        comma = image[:100].find(",")
        if comma == -1 or not image[:comma].endswith(";base64"):
            return V2Code.PARAM_RANGE_OUT_OF_LIMIT
        image = image[comma + 1:]
    return doc, image.encode()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(v2_bodies())
def test__split_image__means_what_a_full_orjson_parse_means(body):
    expected = full_parse_meaning(body)
    if isinstance(expected, V2Code):
        with pytest.raises(V2Error) as e:
            split_image(body)
        assert e.value.code == expected
        return
    doc, image, _ = split_image(body)
    assert bytes(image) == expected[1]
    assert {k: v for k, v in doc.items() if k != "image"} == expected[0]


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.text(max_size=8).filter(lambda k: k != "image" and "\x00" not in k), st.one_of(
           st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=20).filter(lambda s: "\x00" not in s),
           st.fixed_dictionaries({"image": st.text(B64, max_size=20)})), max_size=5)
       .filter(lambda fields: sum(isinstance(v, dict) for v in fields.values()) < 3),  # nested images tried first
       st.binary(max_size=150).map(lambda raw: base64.b64encode(raw).decode()),
       st.sampled_from([0, orjson.OPT_INDENT_2]))
def test__split_image__any_body_with_a_plain_base64_image__takes_the_fast_path(fields, image, option):
    body = orjson.dumps({**fields, "image": image}, option=option)
    found = _fast_split(body)
    assert found is not None
    assert bytes(found[1]) == image.encode()
    # validated in the same pass: the probe gets the head and does not decode the image again
    assert found[2] == validate_base64(image.encode()) is not None


@pytest.mark.parametrize("raw, head", [
    (b'{"image": "QUJD"}', b"ABC"),
    (b'{"image": "data:image/png;base64,QUJD"}', b"ABC"),
    (b'{"image": "QUJ"}', None),  # plain but unpadded: the probe checks (and repairs) it itself
])
def test__split_image__gives_the_head_only_of_an_image_valid_as_a_whole(raw, head):
    assert split_image(raw)[2] == head


# --- the V3 UpscaleBody payload -----------------------------------------------------------------


class Collect:
    """The one method of aiohttp's stream writer a payload calls: keeps each send."""

    def __init__(self) -> None:
        self.sends: list[bytes] = []

    async def write(self, chunk) -> None:
        self.sends.append(bytes(chunk))


def test__upscale_body__writes_the_image_into_valid_v3_json():
    image = memoryview(b'{"image": "QUJD"}')[11:15]
    body = UpscaleBody("4x-UltraSharp", 2.5, image)
    doc = json.loads(body.decode())
    assert doc == {"extra": {"response_image_type": "png"},
                   "request": {"model_name": "4x-UltraSharp", "scale_factor": 2.5, "image_base64": "QUJD"}}
    assert body.size == len(body.decode())
    assert body.content_type == "application/json"


@pytest.mark.parametrize(("length", "sends"), [(16, 1), (JOIN_BELOW + 4, 3)])
async def test__upscale_body__sends_the_same_json_joined_when_small_and_in_three_parts_when_large(length, sends):
    text = b"QUJD" * (length // 4)
    body = UpscaleBody("RealESRNet_x4plus", 4, memoryview(text), response_image_type="webp")
    writer = Collect()
    await body.write(writer)
    sent = b"".join(writer.sends)
    assert len(writer.sends) == sends and len(sent) == body.size
    doc = json.loads(sent)
    assert doc["request"] == {"model_name": "RealESRNet_x4plus", "scale_factor": 4, "image_base64": text.decode()}
    assert doc["extra"] == {"response_image_type": "webp"}
