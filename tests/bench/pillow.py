"""Benchmark (not a test): one 2048 x 2048 composition, the proxy's `compose()` against Pillow alone.

The work of tests/bench/compose.py's body, from the V3 results on: two 2080 x 2400 RGB V3 outputs
(PNG bytes), each LANCZOS to 2048 x 2363 and cropped to 2048 x 2048, blended, encoded as PNG.

- **Pillow alone**: those PIL calls written directly, bytes to PNG bytes.
- **compose()**: the proxy's composer on the Plan the planner makes for that V2 body (with
  `native_scale` emulate, so that the Plan has the local LANCZOS resize; the default, approximate,
  asks V3 for 2048 x 2363 and skips it).

Each at several PNG compression levels and on three images: noise (PNG's worst case), a photo
(gradients and soft shapes with sensor-like grain) and a flat illustration (the same without the
grain), in this process: the median of N runs (CPU and wall clock), the PNG's size, compose /
Pillow. Also the V3 input's encoding (`v3_input_png`, what V3 gets on a "pixels" plan) at levels
1 and 6.
Then the peak memory of one composition: the RSS high-water of a fresh process that composes
once, minus that of a process that only imported everything and read the same bytes (Pillow's
pixels are C allocations, which tracemalloc does not see). The high-water is /proc's VmHWM, not
ru_maxrss: Linux carries the forking parent's RSS into a child's ru_maxrss across exec, so every
child would report at least this (large) benchmark process.

    .venv/bin/python -m tests.bench.pillow [--runs 5] [--levels 1,6] [--kinds noise,photo,flat] [--no-memory]
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from proxy import mappings
from proxy.compose.images import compose, encode_png
from proxy.settings import Settings
from proxy.translate.features import default_policies
from proxy.translate.plan import Plan
from proxy.v2.translation import Translator
from tests.bench.common import rss_mb

INPUT = (520, 600)
V3_OUT = (2080, 2400)  # one native 4x pass
RESIZED, CANVAS = (2048, 2363), (2048, 2048)
VISIBILITY = 0.4  # tests/bench/compose.py's body
KINDS = ("noise", "photo", "flat")


def png(image: Image.Image, level: int = 6) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", compress_level=level)
    return buf.getvalue()


def scene(size: tuple[int, int], grain: bool, seed: int = 1) -> Image.Image:
    """Something like a picture: gradients, soft-edged shapes and (a photo) grain."""
    w, h = size
    rnd = random.Random(seed)
    image = Image.merge("RGB", (Image.linear_gradient("L").resize(size), Image.radial_gradient("L").resize(size),
                                Image.linear_gradient("L").rotate(90).resize(size)))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x, y, r = rnd.randrange(w), rnd.randrange(h), rnd.randrange(8, w // 4)
        colour = tuple(rnd.randrange(256) for _ in range(3))
        if rnd.random() < 0.5:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        else:
            draw.polygon([(x + rnd.randrange(-r, r), y + rnd.randrange(-r, r)) for _ in range(4)], fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(1.5))
    if not grain:
        return image
    noise = Image.frombytes("RGB", size, rnd.randbytes(w * h * 3))
    return Image.blend(image, noise, 0.03)  # up to 8 levels either way, like a sensor's


def noise(size: tuple[int, int], seed: int = 1) -> Image.Image:
    return Image.frombytes("RGB", size, random.Random(seed).randbytes(size[0] * size[1] * 3))


def inputs(kind: str) -> tuple[bytes, list[bytes]]:
    """-> the V2 input (520 x 600 PNG) and the two V3 outputs (2080 x 2400 PNGs, as V3 sends them)."""
    if kind == "noise":
        source, outs = noise(INPUT), [noise(V3_OUT, seed) for seed in (2, 3)]
    else:  # two upscalers of one picture: close, not equal
        source = scene(INPUT, kind == "photo")
        outs = [source.resize(V3_OUT, Image.Resampling.LANCZOS), source.resize(V3_OUT, Image.Resampling.BICUBIC)]
    return png(source, 1), [png(out) for out in outs]


def plan_for(source: bytes) -> Plan:
    """The planner's Plan for tests/bench/compose.py's body."""
    doc = {"resize_mode": 1, "upscaling_resize_w": 2048, "upscaling_resize_h": 2048, "upscaling_crop": True,
           "upscaler_1": "R-ESRGAN 4x+ Anime6B", "upscaler_2": "4x-UltraSharp",
           "extras_upscaler_2_visibility": VISIBILITY}
    translator = Translator(mappings.load(), {**default_policies(), "native_scale": "emulate"})
    plan = translator.translate(doc, base64.b64encode(source)).plan
    assert [(j.size_out, [s.kind for s in b.steps]) for b in plan.branches for j in b.v3_jobs] == \
        [(V3_OUT, ["resize", "crop"])] * 2 and plan.blend, plan.describe()
    return plan


def pillow_alone(outputs: list[bytes], level: int) -> bytes:
    top = RESIZED[1] // 2 - CANVAS[1] // 2  # where CropToCanvas's centred paste lands
    box = (0, top, CANVAS[0], top + CANVAS[1])
    # one output at a time, each intermediate dropped as soon as used: the least memory Pillow needs
    first, second = (Image.open(io.BytesIO(out)).resize(RESIZED, Image.Resampling.LANCZOS).crop(box)
                     for out in outputs)
    return png(Image.blend(first, second, VISIBILITY), level)


def median_ms(runs: list[float]) -> float:
    return round(statistics.median(runs) * 1000, 1)


def timings(plan: Plan, source: bytes, outputs: list[bytes], level: int, runs: int) -> dict:
    """Pillow alone and compose() in turn, after a warm-up: the medians of this thread's CPU time
    (all of the work is on it, and a busy neighbour on a shared machine does not count) and of the
    wall-clock time."""
    cpu: dict[str, list[float]] = {"pillow": [], "compose": []}
    wall: dict[str, list[float]] = {"pillow": [], "compose": []}
    for i in range(runs + 1):
        for name, call in (("pillow", lambda: pillow_alone(outputs, level)),
                           ("compose", lambda: compose(plan, source, outputs, level))):
            started, started_cpu = time.perf_counter(), time.thread_time()
            size = len(call())
            if i:
                cpu[name].append(time.thread_time() - started_cpu)
                wall[name].append(time.perf_counter() - started)
    ratio = {k: round(statistics.median(t["compose"]) / statistics.median(t["pillow"]), 3)
             for k, t in (("cpu", cpu), ("wall", wall))}
    return {"pillow_ms": median_ms(cpu["pillow"]), "compose_ms": median_ms(cpu["compose"]), "ratio": ratio["cpu"],
            "pillow_wall_ms": median_ms(wall["pillow"]), "compose_wall_ms": median_ms(wall["compose"]),
            "wall_ratio": ratio["wall"], "png_bytes": size}


def peak_mb(kind: str, level: int, what: str, work: Path) -> float:
    """The RSS high-water of a fresh process that does `what` once (baseline: nothing), in MB."""
    done = subprocess.run([sys.executable, "-m", "tests.bench.pillow", "--rss", what, kind, str(level), str(work)],
                          capture_output=True, text=True, check=True)
    return float(done.stdout)


def _rss_child(what: str, kind: str, level: int, work: Path) -> None:
    source = (work / f"{kind}-source.png").read_bytes()
    outputs = [(work / f"{kind}-{i}.png").read_bytes() for i in range(2)]
    plan = plan_for(source)
    Image.init()  # the plugins a composition would load
    if what == "compose":
        compose(plan, source, outputs, level)
    elif what == "pillow":
        pillow_alone(outputs, level)
    print(rss_mb(os.getpid(), "VmHWM"))


def measure(runs: int = 5, levels: tuple[int, ...] = (1, 6), kinds: tuple[str, ...] = KINDS,
            memory: bool = True) -> dict:
    """{kind: {"levels": {level: timings}, "peak_mb": {...}, "v3_input": {...}}}, for an aggregate table."""
    report = {}
    default = Settings.model_fields["png_compress_level"].default
    with tempfile.TemporaryDirectory(prefix="pillow-bench-") as tmp:
        work = Path(tmp)
        for kind in kinds:
            source, outputs = inputs(kind)
            plan = plan_for(source)
            pixels = [Image.open(io.BytesIO(out)).tobytes()
                      for out in (pillow_alone(outputs, 0), compose(plan, source, outputs, 0))]
            assert pixels[0] == pixels[1], "compose() and Pillow alone must make the same pixels"
            del pixels
            entry = report[kind] = {"levels": {level: timings(plan, source, outputs, level, runs)
                                               for level in sorted({*levels, default})}}
            # what V3 gets on a "pixels" plan: the bench's input, and the largest V3 takes
            big = png(noise((2048, 2048)) if kind == "noise" else scene((2048, 2048), kind == "photo"), 1)
            entry["v3_input"] = {}
            for name, data in (("520x600", source), ("2048x2048", big)):
                image = plan.read.apply_bytes(data)
                for level in (1, 6):
                    times = []
                    for _ in range(runs):
                        started = time.perf_counter()
                        out = encode_png(image, None, level)  # v3_input_png's encoding, at `level`
                        times.append(time.perf_counter() - started)
                    entry["v3_input"][f"{name} level {level}"] = {"ms": median_ms(times), "png_bytes": len(out)}
            if memory:
                (work / f"{kind}-source.png").write_bytes(source)
                for i, out in enumerate(outputs):
                    (work / f"{kind}-{i}.png").write_bytes(out)
                base = peak_mb(kind, default, "baseline", work)
                entry["peak_mb"] = {"baseline_rss": round(base, 1), **{
                    f"{what} level {default}": round(peak_mb(kind, default, what, work) - base, 1)
                    for what in ("pillow", "compose")}}
    return report


def table(report: dict) -> str:
    lines = ["| image | level | Pillow alone, CPU ms | compose(), CPU ms | compose / Pillow | wall-clock ratio | PNG bytes |",
             "|---|---|---|---|---|---|---|"]
    for kind, entry in report.items():
        for level, t in entry["levels"].items():
            lines.append(f"| {kind} | {level} | {t['pillow_ms']:.0f} | {t['compose_ms']:.0f} | {t['ratio']:.2f} "
                         f"| {t['wall_ratio']:.2f} | {t['png_bytes']:,} |")
    lines += ["", "| image | V3 input, level | encode ms | PNG bytes |", "|---|---|---|---|"]
    for kind, entry in report.items():
        for name, t in entry["v3_input"].items():
            lines.append(f"| {kind} | {name} | {t['ms']} | {t['png_bytes']:,} |")
    if any("peak_mb" in entry for entry in report.values()):
        lines += ["", "| image | peak RSS over baseline, MB |", "|---|---|"]
        for kind, entry in report.items():
            lines.append(f"| {kind} | " + ", ".join(f"{k}: {v}" for k, v in entry["peak_mb"].items()) + " |")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["--rss"]:
        _, _, what, kind, level, work = sys.argv
        return _rss_child(what, kind, int(level), Path(work))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--levels", default="1,6", help="PNG compression levels, besides the default")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--no-memory", action="store_true")
    a = p.parse_args()
    report = measure(a.runs, tuple(int(x) for x in a.levels.split(",")), tuple(a.kinds.split(",")),
                     not a.no_memory)
    print(table(report))


if __name__ == "__main__":
    main()
