"""UPSCALE_PROXY_PNG_COMPRESS_LEVEL: the zlib level of the composed PNG changes its bytes, never its
pixels, and a level zlib does not have stops the boot."""

from __future__ import annotations

import base64
import os

import pytest

from proxy import cli, mappings
from proxy.compose.images import compose
from proxy.settings import Settings
from proxy.v2.translation import Translator
from tests.helpers import poll_until_done, upscale
from tests.images import decode, encode, pattern


def composed() -> tuple:
    """A planner-made Plan with two V3 branches, a crop and a blend, the input and V3's outputs."""
    source = encode(pattern(24, 20))
    doc = {"resize_mode": 1, "upscaling_resize_w": 80, "upscaling_resize_h": 64, "upscaling_crop": True,
           "upscaler_1": "R-ESRGAN 4x+ Anime6B", "upscaler_2": "4x-UltraSharp", "extras_upscaler_2_visibility": 0.4}
    plan = Translator(mappings.load()).translate(doc, base64.b64encode(source)).plan
    assert plan.path == "composed" and plan.blend and all(b.v3_jobs for b in plan.branches)
    outputs = [encode(pattern(*b.v3_jobs[-1].size_out).rotate(90 * i)) for i, b in enumerate(plan.branches)]
    return plan, source, outputs


def test__the_level__changes_the_png_bytes_but_not_its_pixels():
    plan, source, outputs = composed()
    stored, smallest = compose(plan, source, outputs, 0), compose(plan, source, outputs, 9)
    assert len(stored) > 2 * len(smallest)  # level 0 stores the pixels uncompressed
    a, b = decode(stored), decode(smallest)
    assert (a.size, a.mode) == (b.size, b.mode) == ((80, 64), "RGB") and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("level", [0, 9])
async def test__the_setting__reaches_the_stored_png(level, start_emulator, start_proxy):
    """Through the app and the engine: a Lanczos upscale is composed locally, no V3 job."""
    server, _ = await start_emulator()
    client = await start_proxy(str(server.make_url("")), png_compress_level=level)
    reply = await upscale(client, {"image": base64.b64encode(encode(pattern(40, 30))).decode(),
                                   "upscaler_1": "Lanczos", "upscaling_resize": 2})
    data = await poll_until_done(client, reply["data"]["task_id"])
    async with client.session.get(data["imgs"][0]) as resp:
        png = await resp.read()
    raw = 80 * 60 * 3
    assert decode(png).size == (80, 60)
    assert len(png) > raw if level == 0 else len(png) < raw // 2  # stored as is, or compressed


@pytest.mark.parametrize("value", ["-1", "10", "fast"])
def test__a_level_zlib_does_not_have__stops_the_boot_naming_the_variable(value, monkeypatch, capsys):
    for name in [n for n in os.environ if n.startswith("UPSCALE_PROXY_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("UPSCALE_PROXY_PNG_COMPRESS_LEVEL", value)
    with pytest.raises(SystemExit) as e:
        cli._settings(Settings, {})
    assert e.value.code == 2
    assert "  UPSCALE_PROXY_PNG_COMPRESS_LEVEL: " in capsys.readouterr().err


def test__each_level_zlib_has__is_accepted(monkeypatch):
    for level in range(10):
        monkeypatch.setenv("UPSCALE_PROXY_PNG_COMPRESS_LEVEL", str(level))
        assert Settings().png_compress_level == level
