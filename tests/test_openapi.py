"""The OpenAPI 3.1 document of the proxy's own surface (proxy/openapi.json): valid, the app's routes
exactly, and what real replies are. Replies are checked the way a schemathesis run checks them
(its own response validation), plus the status, media type and headers each reply documents."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import jsonschema_rs
import orjson
import pytest
import requests
import schemathesis
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from proxy import __version__, ops
from proxy.app import create_app
from proxy.compose.task import is_composed_id
from proxy.settings import Settings
from proxy.translate.progress import v2_progress
from proxy.v2.models import V2_FIELDS
from tests.helpers import AUTH, CONTRACTS, closed_port_url
from tests.images import encode, pattern

DOC = json.loads(ops.OPENAPI.read_text())
SCHEMA = schemathesis.openapi.from_dict(DOC)
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def resolve(node: dict) -> dict:
    """A `$ref` into this document, followed (once is all the document needs)."""
    if "$ref" not in node:
        return node
    target: Any = DOC
    for part in node["$ref"].removeprefix("#/").split("/"):
        target = target[part]
    return target


def validator(name: str) -> jsonschema_rs.Validator:
    """A JSON Schema 2020-12 validator of components/schemas/`name`, its $refs resolved in the document."""
    return jsonschema_rs.Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": DOC["components"]},
                                              validate_formats=True)


def image(w: int = 24, h: int = 16) -> str:
    return base64.b64encode(encode(pattern(w, h))).decode()


# --- the document itself ---------------------------------------------------------------------------

def test__document__is_valid_openapi_3_1():
    SCHEMA.validate()  # the OpenAPI 3.1 schema (raises on any violation)
    assert DOC["openapi"].startswith("3.1.")
    for result in SCHEMA.get_all_operations():  # every operation loads: its parameters, bodies, $refs
        result.ok()
    for where, schema in _schemas(DOC):
        assert jsonschema_rs.meta.is_valid(schema), where  # each schema object is JSON Schema 2020-12


def _schemas(node: Any, where: str = "#"):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "schema" or where == "#/components/schemas":
                yield f"{where}/{key}", value
            else:
                yield from _schemas(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _schemas(value, f"{where}/{i}")


def test__document__is_this_release():
    assert DOC["info"]["version"] == __version__


def test__schemathesis__can_generate_every_operations_requests():
    """What the fuzz run needs: a strategy for each operation (the V2 body's mode rules included)."""
    for result in SCHEMA.get_all_operations():
        assert result.ok().as_strategy() is not None


@pytest.mark.parametrize("webhooks", [False, True])
def test__document_paths__are_the_apps_routes(webhooks):
    """Both ways: every route is documented and every documented operation is a route. aiohttp's own
    HEAD beside each GET is left out; a route for any method (`*`) is documented with all eight."""
    settings = Settings(upstream=closed_port_url(), webhooks=webhooks, public_url="http://127.0.0.1:1")
    routes = set()
    for route in create_app(settings).router.routes():
        if route.method == "HEAD" and any(r.method == "GET" for r in route.resource):
            continue
        methods = [m.upper() for m in METHODS] if route.method == "*" else [route.method]
        routes |= {(method, route.resource.canonical) for method in methods}
    served = orjson.loads(ops.openapi_document(webhooks))
    documented = {(method.upper(), path) for path, item in served["paths"].items() for method in item
                  if method in METHODS}
    assert sorted(documented - routes) == [], "documented, but no such route"
    assert sorted(routes - documented) == [], "a route the document lacks"


def test__v2_request_schema__has_every_v2_field_nullable_but_image():
    schema = DOC["components"]["schemas"]["V2UpscaleRequest"]
    assert set(schema["properties"]) == set(V2_FIELDS)
    assert schema["required"] == ["image"]
    assert all("null" in field["type"] for name, field in schema["properties"].items() if name != "image")


@pytest.mark.parametrize("sample", ["v2-upscale-request-full.json", "v2-upscale-request-sdk-default.json"])
def test__v2_request_schema__takes_what_legacy_sdks_send(sample):
    validator("V2UpscaleRequest").validate(json.loads((CONTRACTS / sample).read_text()))


def test__v2_request_schema__says_what_the_proxy_refuses():
    check = validator("V2UpscaleRequest")
    assert not check.is_valid({"image": "x", "resize_mode": 1, "upscaling_resize_w": 0, "upscaling_resize_h": 9})
    assert not check.is_valid({"image": "x", "resize_mode": 1})
    assert check.is_valid({"image": "x", "resize_mode": 0, "upscaling_resize_w": 0, "upscaling_resize": 2})
    assert not check.is_valid({"image": "x", "upscaling_resize": 0})
    assert check.is_valid({"image": "x", "resize_mode": 1, "upscaling_resize": 0, "upscaling_resize_w": 1,
                           "upscaling_resize_h": 1})
    assert not check.is_valid({"image": "x", "gfpgan_visibility": 1.5})
    assert not check.is_valid({"image": "x", "upscaling_crop": "yes"})


def test__v2_progress_schema__is_every_field_the_proxy_sends():
    data = v2_progress(status=1, progress=0.5, eta=3, imgs=None, failed_reason="", submit_ms=1, execution_ms=2,
                       finish_ms=0)
    assert set(DOC["components"]["schemas"]["V2ProgressData"]["required"]) == set(data)
    validator("V2ProgressData").validate(data)
    validator("V2ProgressReply").validate(json.loads((CONTRACTS / "v2-progress-reply-successful.json").read_text()))
    validator("V2UpscaleReply").validate(json.loads((CONTRACTS / "v2-upscale-reply.json").read_text()))


# --- real replies ------------------------------------------------------------------------------------

def assert_conforms(method: str, template: str, resp: ClientResponse, body: bytes) -> None:
    """The reply is one the document describes: its status, media type, headers and body."""
    responses = DOC["paths"][template][method.lower()]["responses"]
    documented = resolve(responses.get(str(resp.status)) or responses.get("default") or {})
    assert documented, f"{method} {template}: HTTP {resp.status} is not documented"
    content = documented.get("content", {})
    if content:
        assert resp.content_type in content or "*/*" in content, (method, template, resp.content_type)
    else:
        assert body == b""
    for name, header in documented.get("headers", {}).items():
        header = resolve(header)
        values = resp.headers.getall(name, [])
        assert values or not header.get("required"), f"{method} {template}: no {name} header"
        for value in values:
            jsonschema_rs.validator_for(header["schema"]).validate(value)
    reply = schemathesis.Response(
        status_code=resp.status, headers={k.lower(): resp.headers.getall(k) for k in set(resp.headers)},
        content=body, request=requests.Request(method, str(resp.url)).prepare(), elapsed=0.0, verify=False)
    SCHEMA[template][method].validate_response(reply)  # raises what schemathesis would report


async def call(client: TestClient, method: str, path: str, template: str | None = None,
               **kw) -> tuple[ClientResponse, bytes]:
    async with client.request(method, path, **kw) as resp:
        body = await resp.read()
    assert_conforms(method, template or path.partition("?")[0], resp, body)
    return resp, body


async def v2(client: TestClient, method: str, path: str, template: str | None = None, **kw) -> dict:
    resp, body = await call(client, method, path, template, **kw)
    assert resp.status == 200
    return orjson.loads(body)


async def poll_until_done(client: TestClient, task_id: str) -> dict:
    for _ in range(500):
        doc = await v2(client, "GET", f"/v2/progress?task_id={task_id}", headers=AUTH)
        assert doc["code"] == 0, doc
        if doc["data"]["status"] in (2, 3, 4):
            return doc["data"]
        await asyncio.sleep(0.02)
    raise AssertionError("task never finished")


async def test__direct_round_trip__replies_are_documented(proxy):
    reply = await v2(proxy, "POST", "/v2/upscale", headers=AUTH,
                     json={"image": image(), "upscaler_1": "R-ESRGAN 4x+ Anime6B", "resize_mode": 0,
                           "upscaling_resize": 2, "upscaling_resize_w": None, "upscaling_crop": False})
    assert reply["code"] == 0 and not is_composed_id(reply["data"]["task_id"])
    data = await poll_until_done(proxy, reply["data"]["task_id"])
    assert data["status"] == 2 and data["imgs"]


async def test__composed_round_trip__replies_are_documented(proxy):
    reply = await v2(proxy, "POST", "/v2/upscale", headers=AUTH,
                     json={"image": image(), "upscaler_1": "R-ESRGAN 4x+ Anime6B", "resize_mode": 1,
                           "upscaling_resize_w": 40, "upscaling_resize_h": 40, "upscaling_crop": True,
                           "upscaler_2": "Lanczos", "extras_upscaler_2_visibility": 0.5, "img_expire_ttl": 7200})
    task_id = reply["data"]["task_id"]
    assert reply["code"] == 0 and is_composed_id(task_id)
    data = await poll_until_done(proxy, task_id)
    assert data["status"] == 2
    template = "/v2/images/{task_id}.png"
    resp, png = await call(proxy, "GET", f"/v2/images/{task_id}.png", template)
    assert resp.status == 200 and resp.content_type == "image/png" and png.startswith(b"\x89PNG")
    resp, body = await call(proxy, "GET", "/v2/images/00000000-0000-4000-8000-000000000000.png", template)
    assert resp.status == 404 and orjson.loads(body)["code"] == 3


@pytest.mark.parametrize(("method", "path", "kw", "code"), [
    ("POST", "/v2/upscale", {"json": {"image": "aGVsbG8="}}, 4),  # no key
    ("POST", "/v2/upscale", {"data": b"not json", "headers": AUTH}, 1),
    ("POST", "/v2/upscale", {"json": {"image": image(), "upscaler_1": "Nope"}, "headers": AUTH}, 2),
    ("POST", "/v2/upscale", {"json": {"image": "aGVsbG8="}, "headers": AUTH}, 6),  # not an image
    ("GET", "/v2/progress", {"headers": AUTH}, 1),
    ("GET", "/v2/progress?task_id=00000000-0000-4000-8000-000000000000", {"headers": AUTH}, 3),
])
async def test__v2_errors__are_the_documented_envelope(proxy, method, path, kw, code):
    doc = await v2(proxy, method, path, **kw)
    assert doc["code"] == code
    if path.startswith("/v2/progress"):  # a poll's error is a final failure, never data: null
        assert (doc["data"]["status"], doc["data"]["failed_reason"]) == (3, doc["msg"])
    else:
        assert doc["data"] is None


async def test__operations_and_migration_replies__are_documented(proxy):
    await call(proxy, "GET", "/healthz")
    resp, _ = await call(proxy, "GET", "/readyz")
    assert resp.status == 200
    await call(proxy, "GET", "/metrics")
    await call(proxy, "GET", "/_proxy/guide")
    preview = await v2(proxy, "POST", "/_proxy/translate", json={"image": image(), "upscaling_resize": 3})
    assert preview["code"] == 0 and preview["data"]["path"] == "direct"
    refused = await v2(proxy, "POST", "/_proxy/translate", data=b"[]")
    assert refused["code"] == 1
    resp, body = await call(proxy, "GET", "/_proxy/openapi.json")
    assert orjson.loads(body) == orjson.loads(ops.openapi_document(False))
    assert "/_proxy/webhooks/v3/{token}" not in orjson.loads(body)["paths"]


async def test__v3_pass_through__replies_are_documented(proxy):
    resp, _ = await call(proxy, "GET", "/v3/async/task-result?task_id=nope", "/v3/{tail}", headers=AUTH)
    assert resp.status == 404


async def test__webhook_replies__are_documented(aiohttp_client, tmp_path):
    settings = Settings(upstream=closed_port_url(), data_dir=tmp_path / "data", webhooks=True,
                        public_url="http://127.0.0.1:1")
    client = await aiohttp_client(create_app(settings))
    resp, _ = await call(client, "POST", "/_proxy/webhooks/v3/unknown", "/_proxy/webhooks/v3/{token}",
                         json={"event_type": "ASYNC_TASK_RESULT", "payload": {}})
    assert resp.status == 404
    resp, body = await call(client, "GET", "/_proxy/openapi.json")
    assert "/_proxy/webhooks/v3/{token}" in orjson.loads(body)["paths"]
