"""Hostile input against a real proxy on loopback: whatever a V2 client sends, it gets HTTP 200 and a
V2 body with a known code (never -1, never a stack trace), and the proxy keeps serving. Below HTTP,
whatever bytes a client sends, the server answers or closes, never hangs, and keeps serving; a
request aiohttp can't parse gets a fixed 400 that echoes none of its bytes."""

from __future__ import annotations

import asyncio
import base64
import struct
import zlib

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from aiohttp import web

from proxy.app import create_app
from proxy.errors import V2Code
from proxy.serving import MALFORMED, ProxyRunner
from proxy.settings import Settings
from proxy.v2.handlers import _host_header
from tests.helpers import AUTH, KEY, poll_until_done, upscale, v2_call
from tests.images import encode, pattern

KNOWN_CODES = {int(code) for code in V2Code} - {V2Code.INTERNAL_ERROR}
LOOPBACK = "127.0.0.1"
HOSTILE = settings(max_examples=250, deadline=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a size its pixel data does not have."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0\0\0\0"))
            + png_chunk(b"IEND", b""))


def png_with_short_pixel_data(mode: str) -> bytes:
    """A PNG whose chunks are whole but whose IDAT holds half the compressed pixels."""
    raw = encode(pattern(64, 48, mode))
    at = raw.index(b"IDAT") - 4
    length = struct.unpack(">I", raw[at:at + 4])[0]
    pixels = raw[at + 8:at + 8 + length]
    return raw[:at] + png_chunk(b"IDAT", pixels[:len(pixels) // 2]) + png_chunk(b"IEND", b"")


RGBA_PNG = encode(pattern(64, 48, "RGBA"))
JPEG = encode(pattern(64, 48), "JPEG")
IMAGES = {
    "png": encode(pattern(16, 12)),
    "1x1": encode(pattern(1, 1)),
    "2048x1": encode(pattern(2048, 1)),
    "claims 30000x30000": png_claiming(30000, 30000),
    "jpeg cut in half": JPEG[:len(JPEG) // 2],
    "rgba png cut in its IDAT": RGBA_PNG[:RGBA_PNG.index(b"IDAT") + 40],
    "rgb png with short pixel data": png_with_short_pixel_data("RGB"),
    "header only": RGBA_PNG[:33],
    "not an image": b"hello, world",
}
IMAGE_TEXT = st.one_of(
    st.sampled_from([b64(raw) for raw in IMAGES.values()]),
    st.sampled_from(["", "====", "not base64!", "data:image/png;base64,", "data:,", "data:image/png;base64," + b64(IMAGES["png"]),
                     b64(IMAGES["png"]).rstrip("="), "\u00e9" + b64(IMAGES["png"])]),
    st.text(max_size=40),
)

# JSON values as text: what orjson.dumps can make, and what it can't (NaN, 1e400, 10000 nested arrays)
RAW_VALUES = st.sampled_from([
    b"1e400", b"-1e400", b"1e308", b"-1e308", b"1e-400", b"NaN", b"Infinity", b"-Infinity", b'"NaN"', b'"Infinity"',
    b'"inf"', b'"-inf"', b'"1e308"', b"100000000000000000000000000000", b"18446744073709551616",
    b"-9223372036854775809", b"[" * 10000 + b"]" * 10000, b"{" * 5000, b'"' + b"x" * 200_000 + b'"',
    b'"\\ud800"', b'"\\u0000"', b"tru", b"",
])
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=30), st.sampled_from(["R-ESRGAN 4x+", "4x-UltraSharp", "LDSR", "None", "\u202e\U0001f4a5"])),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=5), children, max_size=3)),
    max_leaves=6,
).map(orjson.dumps)
VALUE = st.one_of(JSON_VALUES, JSON_VALUES, RAW_VALUES)
FIELDS = ["upscaler_1", "resize_mode", "upscaling_resize", "upscaling_resize_w", "upscaling_resize_h", "upscaling_crop",
          "upscaler_2", "extras_upscaler_2_visibility", "gfpgan_visibility", "codeformer_visibility",
          "codeformer_weight", "img_expire_ttl"]


@st.composite
def hostile_bodies(draw) -> bytes:
    """V2 bodies with wrong types, NaN and infinities, huge numbers and strings, deep nesting, duplicate
    keys, lying images; now and then not an object or not JSON at all."""
    members = [(b'"image"', orjson.dumps(draw(IMAGE_TEXT))) for _ in range(draw(st.sampled_from([1, 1, 1, 2, 0])))]
    for _ in range(draw(st.integers(0, 5))):
        key = draw(st.one_of(st.sampled_from(FIELDS), st.text(max_size=10)))
        members.insert(draw(st.integers(0, len(members))), (orjson.dumps(key), draw(VALUE)))
    body = b"{" + b", ".join(k + b": " + v for k, v in members) + b"}"
    return draw(st.sampled_from([body] * 8 + [b"[" + body + b"]", b"[" * 10000 + b"]" * 10000, b"\xff\xfe" + body,
                                              body[:len(body) // 2], b""]))


async def answer(client, method: str, path: str, **kw) -> dict:
    """A V2 call that must get HTTP 200 (404 for an image) and a V2 body with a known code."""
    async with client.request(method, path, **kw) as resp:
        text = await resp.read()
        assert resp.status in ((200, 404) if path.startswith("/v2/images/") else (200,)), text[:300]
        assert resp.content_type == "application/json", text[:300]
    doc = orjson.loads(text)
    assert set(doc) == {"code", "msg", "data"} and doc["code"] in KNOWN_CODES, doc
    return doc


async def still_serving(client) -> None:
    reply = await upscale(client, {"image": b64(IMAGES["png"]), "upscaling_resize": 2})
    assert reply["code"] == 0, reply


def logged(log_lines) -> list[dict]:
    # split on newlines only: a logged User-Agent may hold U+2028 or U+0085, which str.splitlines splits on
    return [orjson.loads(line) for line in log_lines.stream.getvalue().split(b"\n") if line]


def no_unexpected_errors(log_lines) -> None:
    assert not [line for line in logged(log_lines) if line.get("event") == "unexpected error"]


# --- V2 bodies ------------------------------------------------------------------------------------

@HOSTILE
@given(body=hostile_bodies())
async def test__hostile_bodies__each_get_http_200_and_a_v2_body_with_a_known_code(proxy, log_lines, body):
    doc = await answer(proxy, "POST", "/v2/upscale", data=body, headers={**AUTH, "Content-Type": "application/json"})
    event(f"code {doc['code']}")
    assert (doc["code"] == 0) == (doc["data"] is not None and "task_id" in doc["data"])
    await still_serving(proxy)
    no_unexpected_errors(log_lines)


async def test__after_hostile_bodies__the_proxy_serves_and_logged_no_unexpected_error(proxy, log_lines):
    for body in (b"[" * 10000 + b"]" * 10000, b'{"image": 1e400}', b'{"image": "x", "upscaling_resize": NaN}'):
        await answer(proxy, "POST", "/v2/upscale", data=body, headers=AUTH)
    await still_serving(proxy)
    no_unexpected_errors(log_lines)


@pytest.mark.parametrize(("value", "code"), [
    ("1e308", 6), ("100000000000000000000000000000", 6), ("-1e308", 6),
    ("1e400", 1), ("-1e400", 1),  # infinite as a double: orjson refuses the body
    ('"NaN"', 1), ('"Infinity"', 1), ('"-inf"', 1), ('"1e308"', 1),  # a string is never a number
])
@pytest.mark.parametrize("field", ["upscaling_resize", "upscaling_resize_w", "img_expire_ttl",
                                   "extras_upscaler_2_visibility"])
async def test__huge_and_infinite_numbers__are_code_1_or_6_on_upscale_and_translate(proxy, field, value, code):
    image = b64(IMAGES["png"])
    body = f'{{"image": "{image}", "resize_mode": {int(field == "upscaling_resize_w")}, "upscaling_resize_h": 10, ' \
           f'"{field}": {value}}}'.encode()
    submitted = await answer(proxy, "POST", "/v2/upscale", data=body, headers=AUTH)
    preview = await answer(proxy, "POST", "/_proxy/translate", data=body)
    assert submitted["code"] == preview["code"] == code, (submitted, preview)


async def test__upscaling_resize_1e308__is_code_6(proxy):
    body = f'{{"image": "{b64(IMAGES["png"])}", "upscaling_resize": 1e308}}'.encode()
    assert (await answer(proxy, "POST", "/v2/upscale", data=body, headers=AUTH))["code"] == 6
    assert (await answer(proxy, "POST", "/_proxy/translate", data=body))["code"] == 6


@pytest.mark.parametrize(("name", "code"), [
    ("claims 30000x30000", 6),
    ("rgba png cut in its IDAT", 6),
    ("header only", 6),
    ("not an image", 6),
    ("1x1", 0),
    ("2048x1", 6),  # 4096 px wide at the default factor 2
])
async def test__lying_truncated_and_extreme_images__are_answered_at_submit(proxy, name, code):
    reply = await upscale(proxy, {"image": b64(IMAGES[name])})
    assert reply["code"] == code, reply
    await still_serving(proxy)


async def test__2048x1_at_factor_1__is_served(proxy):
    reply = await upscale(proxy, {"image": b64(IMAGES["2048x1"]), "upscaling_resize": 1})
    assert reply["code"] in (0, 6), reply


@pytest.mark.parametrize("name", ["jpeg cut in half", "rgb png with short pixel data"])
async def test__a_truncation_the_probe_cannot_see__ends_the_task_with_status_3_and_a_reason(proxy, name):
    reply = await upscale(proxy, {"image": b64(IMAGES[name]), "upscaling_resize": 2})
    if reply["code"] == 6:  # seen at submit: as good
        return
    assert reply["code"] == 0, reply
    data = await poll_until_done(proxy, reply["data"]["task_id"])
    assert data["status"] == 3 and data["failed_reason"], data


async def test__rgba_png_with_short_pixel_data__is_not_an_internal_error(proxy):
    reply = await upscale(proxy, {"image": b64(png_with_short_pixel_data("RGBA")), "upscaling_resize": 2})
    assert reply["code"] != -1, reply


# --- headers --------------------------------------------------------------------------------------

HEADER_BYTES = st.binary(max_size=60).map(lambda raw: bytes(b for b in raw if b == 9 or b >= 32 and b != 127))
HEADER_VALUE = st.one_of(
    HEADER_BYTES,
    st.sampled_from([b"Bearer k\xff\xfe", b"k\xff", b"Bearer \xc3\xa9", b"Bearer a b", b"Bearer", b"\xff" * 200,
                     b"Basic dXNlcjpwYXNz", b"Bearer " + b"k" * 4000]),
    st.text(st.characters(min_codepoint=32, exclude_characters="\x7f", codec="utf-8"), max_size=20).map(str.encode),
)
HOST_VALUE = st.one_of(HEADER_VALUE, st.sampled_from([
    b"evil.example:1234/", b"[::1", b"a b", b"a:99999", b"", b"\xff", b"example.com", b"[::1]:8080", b"x:0",
    b"localhost:8080", b"a/b@c", b"example.com:80:80"]))


async def raw_request(port: int, head: bytes, body: bytes = b"", timeout: float = 10) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 request written as bytes; (status, headers, body) of the answer."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        await writer.wait_closed()
    status_line, _, rest = raw.partition(b"\r\n")
    header_block, _, payload = rest.partition(b"\r\n\r\n")
    headers = dict(line.split(b": ", 1) for line in header_block.split(b"\r\n") if b": " in line)
    return int(status_line.split()[1]), {k.lower(): v for k, v in headers.items()}, payload


def assert_v2(status: int, headers: dict, payload: bytes, allow_404: bool = False) -> dict:
    assert status in ((200, 404) if allow_404 else (200,)), payload[:300]
    assert headers[b"content-type"].startswith(b"application/json"), payload[:300]
    doc = orjson.loads(payload)
    assert set(doc) == {"code", "msg", "data"} and doc["code"] in KNOWN_CODES, doc
    return doc


SMALL_BODY = orjson.dumps({"image": b64(IMAGES["png"]), "upscaling_resize": 2})


@HOSTILE
@given(authorization=HEADER_VALUE, omni_key=HEADER_VALUE, user_agent=HEADER_VALUE, host=HOST_VALUE,
       content_type=HEADER_VALUE, target=st.sampled_from(["upscale", "progress", "image"]))
async def test__hostile_headers__each_get_http_200_and_a_v2_body_with_a_known_code(
        proxy, log_lines, authorization, omni_key, user_agent, host, content_type, target):
    request_line = {"upscale": b"POST /v2/upscale", "progress": b"GET /v2/progress?task_id=abc",
                    "image": b"GET /v2/images/abc.png"}[target]
    head = (request_line + b" HTTP/1.1\r\nHost: " + host + b"\r\nAuthorization: " + authorization
            + b"\r\nX-Omni-Key: " + omni_key + b"\r\nUser-Agent: " + user_agent.decode("latin-1").encode("utf-8")
            + b"\r\nContent-Type: " + content_type + b"\r\n")
    status, headers, payload = await raw_request(proxy.server.port, head, SMALL_BODY if target == "upscale" else b"")
    event(f"code {assert_v2(status, headers, payload, allow_404=target == 'image')['code']}")
    no_unexpected_errors(log_lines)


@pytest.mark.parametrize("key", [b"k\xff\xfe", b"\xff", b"\xc3\xa9t\xc3\xa9", b"k\x80"])
@pytest.mark.parametrize("header", [b"Authorization: Bearer ", b"Authorization: ", b"X-Omni-Key: "])
async def test__a_key_that_is_not_printable_ascii__is_code_4_with_the_audit_event(proxy, log_lines, header, key):
    head = b"POST /v2/upscale HTTP/1.1\r\nHost: localhost\r\n" + header + key + b"\r\n"
    doc = assert_v2(*await raw_request(proxy.server.port, head, SMALL_BODY))
    assert doc["code"] == 4 and "invalid API key" in doc["msg"]
    [event] = [line for line in logged(log_lines) if line["event"] == "v2.deprecated_call"]
    assert event["v2_code"] == 4 and event["fingerprint"] is None
    no_unexpected_errors(log_lines)
    await still_serving(proxy)


async def test__a_user_agent_that_is_not_utf8__gets_a_v2_body(proxy):
    head = b"POST /v2/upscale HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer " + KEY.encode() + \
        b"\r\nUser-Agent: agent\xff\r\n"
    assert_v2(*await raw_request(proxy.server.port, head, SMALL_BODY))


# --- the Host header and composed image URLs --------------------------------------------------------

async def composed_task(client) -> str:
    reply = await upscale(client, {"image": b64(encode(pattern(9, 9))), "upscaling_resize": 6})
    assert reply["code"] == 0, reply
    await poll_until_done(client, reply["data"]["task_id"])
    return reply["data"]["task_id"]


async def image_url(client, task_id: str, host: bytes) -> str:
    head = (b"GET /v2/progress?task_id=" + task_id.encode() + b" HTTP/1.1\r\nHost: " + host
            + b"\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n")
    doc = assert_v2(*await raw_request(client.server.port, head))
    assert doc["code"] == 0 and doc["data"]["status"] == 2, doc
    return doc["data"]["imgs"][0]


@pytest.mark.parametrize(("host", "base"), [
    (b"proxy.example:8443", "http://proxy.example:8443"),
    (b"[::1]:8080", "http://[::1]:8080"),
    (b"10.0.0.7", "http://10.0.0.7"),
    (b"my_proxy:8080", "http://my_proxy:8080"),
])
async def test__a_valid_host__is_the_base_of_composed_image_urls(proxy, host, base):
    task_id = await composed_task(proxy)
    assert await image_url(proxy, task_id, host) == f"{base}/v2/images/{task_id}.png"


@pytest.mark.parametrize("host", [b"evil.example:1234/", b"a:99999", b"[::1", b"a b", b"\xff", b"",
                                  b"x:0", b"a/b@c", b"example.com:80:80", b"evil.example/x?", b"-x.example"])
async def test__a_malformed_host__falls_back_to_the_address_the_request_came_to(proxy, host):
    task_id = await composed_task(proxy)
    url = await image_url(proxy, task_id, host)
    assert url == f"http://{LOOPBACK}:{proxy.server.port}/v2/images/{task_id}.png"
    async with proxy.session.get(url) as resp:
        assert resp.status == 200 and resp.content_type == "image/png"


async def test__with_a_public_url__the_host_header_is_not_used(emulator, start_proxy):
    client = await start_proxy(str(emulator[0].make_url("")), public_url="https://proxy.example/base/")
    task_id = await composed_task(client)
    assert await image_url(client, task_id, b"evil.example") == f"https://proxy.example/base/v2/images/{task_id}.png"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30) | st.from_regex(r"\A[a-z0-9_.\-\[\]:]{0,30}\Z"))
def test__a_host_header_either_makes_a_valid_url_or_is_refused(value):
    from yarl import URL

    found = _host_header(value)
    if found is not None:
        url = URL.build(scheme="http", host=found[0], port=found[1])
        assert url.host is not None and "/" not in str(url).removeprefix("http://")


# --- below HTTP: raw bytes on a socket ------------------------------------------------------------

async def exchange(port: int, chunks: list[bytes], *, close_write: bool = True, pause: float = 0,
                   timeout: float = 10) -> bytes:
    """Send `chunks` (pausing between them), maybe half-close, and read until the server closes or
    `timeout` passes (which fails the test: the server must answer or close)."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        if close_write and writer.can_write_eof():
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


def http_status(raw: bytes) -> int | None:
    return int(raw.split()[1]) if raw.startswith(b"HTTP/1.") else None


@pytest.mark.parametrize("garbage", [
    b"\x00" * 64,
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)),  # a TLS ClientHello
    b"GET / HTTP/9.9\r\n\r\n",
    b"\r\n\r\n\r\n",
    b"POST /v2/upscale HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"POST /v2/upscale HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"POST /v2/upscale HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nxx\r\n",
    b"POST /v2/upscale HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET /v2/progress?task_id=\xff HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v2/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v2/progress HTTP/1.1\r\nno colon here\r\n\r\n",
    b"GET /v2/progress HTTP/1.1\r\nX: a\x00b\r\n\r\n",
    b"\xff" * 5000,
])
async def test__garbage_bytes__are_answered_or_closed_and_the_proxy_keeps_serving(proxy, garbage):
    raw = await exchange(proxy.server.port, [garbage])
    assert raw == b"" or http_status(raw) is not None, raw[:200]
    if http_status(raw) == 200:  # parsed as a request after all: then a V2 body
        assert b'"code"' in raw
    await still_serving(proxy)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=1, max_size=300))
async def test__random_bytes__are_answered_or_closed(proxy, garbage):
    raw = await exchange(proxy.server.port, [garbage])
    assert raw == b"" or http_status(raw) is not None, raw[:200]


@pytest.mark.parametrize("cut", [10, 40, 90])
async def test__a_request_cut_in_its_head__is_closed_and_the_proxy_keeps_serving(proxy, cut):
    head = (b"POST /v2/upscale HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer " + KEY.encode()
            + b"\r\nContent-Length: %d\r\n\r\n" % len(SMALL_BODY))
    raw = await exchange(proxy.server.port, [head[:cut]])
    assert raw == b"" or http_status(raw) is not None
    await still_serving(proxy)


async def test__a_request_cut_in_its_body__is_answered_or_closed_and_the_proxy_keeps_serving(proxy):
    head = (b"POST /v2/upscale HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer " + KEY.encode()
            + b"\r\nContent-Length: %d\r\n\r\n" % len(SMALL_BODY))
    raw = await exchange(proxy.server.port, [head + SMALL_BODY[:len(SMALL_BODY) // 2]])
    assert raw == b"" or http_status(raw) is not None, raw[:300]
    if http_status(raw) == 200:
        assert orjson.loads(raw.partition(b"\r\n\r\n")[2])["code"] in KNOWN_CODES
    await still_serving(proxy)


@pytest.mark.parametrize("head", [
    b"GET /v2/progress?task_id=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n",  # request line
    b"GET /v2/progress?task_id=abc HTTP/1.1\r\nHost: localhost\r\nX-Long: " + b"v" * 9000 + b"\r\n\r\n",
    b"GET /v2/progress?task_id=abc HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer " + b"k" * 70000 + b"\r\n\r\n",
    b"GET /v2/progress?task_id=abc HTTP/1.1\r\nHost: localhost\r\n" + b"X-Many: v\r\n" * 20000 + b"\r\n",
])
async def test__header_lines_over_aiohttps_limit__are_refused_and_the_proxy_keeps_serving(proxy, head):
    raw = await exchange(proxy.server.port, [head], close_write=False)
    assert raw == b"" or (http_status(raw) or 0) >= 400, raw[:300]
    await still_serving(proxy)


async def test__a_slow_client_sending_one_byte_at_a_time__is_answered(proxy):
    request = (b"GET /v2/progress?task_id=abc HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer "
               + KEY.encode() + b"\r\nConnection: close\r\n\r\n")
    raw = await exchange(proxy.server.port, [request[i:i + 1] for i in range(len(request))], close_write=False,
                         pause=0.002)
    assert http_status(raw) == 200
    assert orjson.loads(raw.partition(b"\r\n\r\n")[2])["code"] in KNOWN_CODES


async def test__a_client_that_stalls_mid_request__does_not_stop_the_others(proxy):
    _, writer = await asyncio.open_connection(LOOPBACK, proxy.server.port)
    try:
        writer.write(b"POST /v2/upscale HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n{\"image\": ")
        await writer.drain()
        await still_serving(proxy)
        doc = await v2_call(proxy, "GET", "/v2/progress?task_id=abc")
        assert doc["code"] in KNOWN_CODES
    finally:
        writer.close()
        await writer.wait_closed()


# --- a request aiohttp's parser refuses: a fixed 400, none of its bytes echoed --------------------

CANARY = b"sk-canary-7f3a9c"  # stands for a key in the bytes the parser refuses


@pytest.fixture
async def served(emulator, tmp_path):
    """The proxy on a loopback port as `serve` runs it (ProxyRunner): its port."""
    server, _ = emulator
    runner = ProxyRunner(create_app(Settings(upstream=str(server.make_url("")), data_dir=tmp_path / "data")), grace=1)
    await runner.setup()
    try:
        await web.TCPSite(runner, LOOPBACK, 0).start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("request_head, bad", [
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + CANARY + b"\x01\x7f\r\n\r\n", b"\x01\x7f"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Omni-" + CANARY + b"\x01: v\r\n\r\n", b"\x01"),
    (b"POST /v2/upscale HTTP/1.1\r\nHost: x\r\nContent-Length: 5" + CANARY + b"\r\n\r\n", b""),
    (b"GET /v2/progress?task_id=" + CANARY + b"\x01\x1b HTTP/1.1\r\nHost: x\r\n\r\n", b"\x01\x1b"),
    (b"G" + CANARY + b"\x02ET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x02"),
], ids=["header value", "header name", "content-length", "request target", "method"])
async def test__a_request_the_parser_refuses__gets_a_fixed_400_without_its_bytes(served, log_lines, request_head, bad):
    raw = await exchange(served, [request_head], close_write=False)
    assert http_status(raw) == 400 and raw.partition(b"\r\n\r\n")[2] == MALFORMED.encode(), raw
    for echoed in [CANARY, *(bytes([b]) for b in bad), *(b"\\x%02x" % b for b in bad)]:  # as sent, or quoted
        assert echoed not in raw, (echoed, raw)
    assert CANARY.decode() not in log_lines.text  # nor logged (proxy/logs.py's LibraryLogs)
    assert_v2(*await raw_request(served, b"GET /v2/progress?task_id=abc HTTP/1.1\r\nHost: x\r\n"
                                 b"Authorization: Bearer " + KEY.encode() + b"\r\n"))  # and it keeps serving
