"""The V2 body as bytes (`split_image`) and the V3 body written around the client's image (`UpscaleBody`)."""

import json

import pytest

from proxy.errors import V2Error
from proxy.v2.body import split_image
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
