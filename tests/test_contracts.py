"""The sample bodies in ../shared/contracts: what the proxy reads, and what the emulator writes."""

import asyncio
import json
import os
from pathlib import Path

import aiohttp
import pytest

from proxy.mappings import load
from proxy.translate.errors import from_v3_error
from proxy.translate.progress import progress_data
from proxy.v2.models import validate_options
from proxy.v3.models import SubmitReply, TaskResult
from tests.helpers import AUTH, CONTRACTS, poll_until_done, upscale
from tests.images import b64

MAPPINGS = load()


def sample(name: str) -> dict:
    return json.loads((CONTRACTS / f"{name}.json").read_text())


SHARED = Path(__file__).parent.parent.parent / "shared" / "contracts"


def test__the_copy_of_the_contracts__matches_the_shared_ones():
    if not SHARED.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail("CI has ../shared beside the checkout: the copy of the contracts can't be checked")
        pytest.skip("no ../shared/contracts beside this checkout")
    shared = {p.name: p.read_bytes() for p in SHARED.iterdir()}
    copied = {p.name: p.read_bytes() for p in CONTRACTS.iterdir()}
    assert copied == shared


def assert_conforms(actual, expected, where="$"):
    """`actual` has every key of `expected`, recursively, with values of the same JSON type.
    Epoch-ms times may be strings or ints (the V3 docs and examples disagree); null is a wildcard."""
    if expected is None:
        return
    if isinstance(expected, dict):
        assert isinstance(actual, dict), where
        for key, value in expected.items():
            assert key in actual, f"{where}.{key} missing"
            assert_conforms(actual[key], value, f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list), where
        if expected and actual:
            assert_conforms(actual[0], expected[0], f"{where}[0]")
    elif where.endswith("_ms"):
        assert str(actual).isdigit(), where
    elif isinstance(expected, bool) or isinstance(actual, bool):
        assert type(actual) is type(expected), where
    elif isinstance(expected, (int, float)):
        assert isinstance(actual, (int, float)), where
    else:
        assert type(actual) is type(expected), where


@pytest.mark.parametrize("name", ["queued", "processing", "succeed", "failed"])
def test__v3_task_result_samples__parse(name):
    result = TaskResult.model_validate(sample(f"v3-task-result-{name}"))
    assert result.task.status == f"TASK_STATUS_{name.upper()}"


def test__v3_succeed_sample__translates_to_the_v2_progress_sample():
    data = progress_data(TaskResult.model_validate(sample("v3-task-result-succeed")), MAPPINGS.task_status)
    expected = sample("v2-progress-reply-successful")["data"]
    assert data == {**expected, "imgs": [sample("v3-task-result-succeed")["images"][0]["image_url"]]}


def test__v3_failed_sample__is_status_3_with_its_reason():
    data = progress_data(TaskResult.model_validate(sample("v3-task-result-failed")), MAPPINGS.task_status)
    assert (data["status"], data["failed_reason"], data["imgs"]) == (3, "image decode failed", None)
    assert data["finish_time"] == "2024-01-24 07:08:18"


def test__v3_queued_sample__has_int_times_and_is_status_0():
    data = progress_data(TaskResult.model_validate(sample("v3-task-result-queued")), MAPPINGS.task_status)
    assert (data["status"], data["progress"], data["eta_relative"]) == (0, 0, 4)
    assert data["submit_time"] == "2024-01-24 07:08:17" and data["execution_time"] == ""


def test__v3_upscale_reply_sample__parses():
    assert SubmitReply.model_validate(sample("v3-upscale-reply")).task_id


@pytest.mark.parametrize(("name", "code"), [
    ("balance", 7), ("invalid-api-key", 4), ("invalid-request-body", 1), ("rate-limit", 5),
    ("task-not-found", 3), ("unavailable", 5),
])
def test__v3_error_samples__map_to_v2_codes(name, code):
    doc = sample(f"v3-error-{name}")
    err = from_v3_error(doc["code"], json.dumps(doc).encode(), MAPPINGS.errors)
    assert err.code == code and doc["reason"] in err.msg


@pytest.mark.parametrize("name", ["sdk-default", "full"])
def test__v2_request_samples__validate(name):
    validate_options(sample(f"v2-upscale-request-{name}"))


async def test__emulator_replies__conform_to_the_v3_samples(emulator):
    server, _ = emulator
    request = sample("v3-upscale-request")
    request["request"]["image_base64"] = b64(16, 16)
    async with aiohttp.ClientSession(base_url=str(server.make_url("")), headers=AUTH) as http:
        async with http.post("/v3/async/upscale", json=request) as resp:
            assert resp.status == 200
            reply = await resp.json()
        assert_conforms(reply, sample("v3-upscale-reply"))
        seen = set()
        for _ in range(100):
            async with http.get("/v3/async/task-result", params={"task_id": reply["task_id"]}) as resp:
                result = await resp.json()
            status = result["task"]["status"].removeprefix("TASK_STATUS_").lower()
            assert_conforms(result, sample(f"v3-task-result-{status}"))
            seen.add(status)
            if status == "succeed":
                break
            await asyncio.sleep(0.01)
        assert seen == {"queued", "processing", "succeed"}
        for name, call in [
            ("task-not-found", http.get("/v3/async/task-result", params={"task_id": "nope"})),
            ("invalid-request-body", http.post("/v3/async/upscale", json={**request, "request": {
                **request["request"], "scale_factor": 1}})),
        ]:
            async with call as resp:
                doc = await resp.json()
            expected = sample(f"v3-error-{name}")
            assert resp.status == expected["code"]
            assert_conforms(doc, expected)
            assert doc["reason"] == expected["reason"]


async def test__v2_replies__conform_to_the_v2_samples(proxy):
    reply = await upscale(proxy, {"image": b64(), "upscaler_1": "4x-UltraSharp"})
    assert_conforms(reply, sample("v2-upscale-reply"))
    data = await poll_until_done(proxy, reply["data"]["task_id"])
    assert_conforms({"code": 0, "msg": "", "data": data}, sample("v2-progress-reply-successful"))
