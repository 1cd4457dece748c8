"""Two results of one V2 body, V2's and the translation's, compared as people would (pure; numpy).

First the outcome: both finished with an image, both failed, or one of each. Then the images:
size and mode exactly (V2 clients read both), then how far the pixels are apart, as PSNR (dB;
infinite for identical pixels) and SSIM (Wang et al. 2004: an 11-tap Gaussian window, sigma 1.5,
K1 0.01, K2 0.03, on the luma), against thresholds that are settings. Two images can be "the same"
without being the same bytes: PNG encoders and their levels differ.

A difference is *explained* when the translation said it would not be exact: a feature unit the
plan approximated or skipped (face restoration without a restorer, a model V3 lacks) is named in
the verdict, and the comparison does not count against the client.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

Outcome = Literal["match", "mismatch", "explained"]
_L = 255.0
_C1, _C2 = (0.01 * _L) ** 2, (0.03 * _L) ** 2


@dataclass(frozen=True)
class Thresholds:
    min_psnr: float = 40.0  # dB
    min_ssim: float = 0.98


@dataclass(frozen=True)
class Comparison:
    outcome: Outcome
    why: str  # in words, for the dashboard and the audit
    psnr: float | None = None  # dB; None when there were no two images to compare
    ssim: float | None = None
    sizes: tuple[tuple[int, int], tuple[int, int]] | None = None  # (V2's, the translation's)
    modes: tuple[str, str] | None = None
    explained_by: tuple[str, ...] = ()  # the feature units the translation approximated

    def to_doc(self) -> dict:
        return {"outcome": self.outcome, "why": self.why,
                "psnr": None if self.psnr is None else (round(self.psnr, 2) if math.isfinite(self.psnr) else "inf"),
                "ssim": None if self.ssim is None else round(self.ssim, 5),
                "sizes": self.sizes, "modes": self.modes, "explained_by": list(self.explained_by)}


def compare_outcomes(v2_status: int, v3_status: int) -> str | None:
    """Why two outcomes differ, or None when both have an image, or both failed."""
    if v2_status == v3_status or {v2_status, v3_status} <= {3, 4}:
        return None
    said = {2: "an image", 3: "a failure", 4: "a timeout"}
    return f"V2 gave {said.get(v2_status, v2_status)}, the translation {said.get(v3_status, v3_status)}"


def compare_images(v2_png: bytes, v3_png: bytes, thresholds: Thresholds,
                   approximated: tuple[str, ...] = ()) -> tuple[Comparison, bytes | None]:
    """-> the comparison, and a heat map of the difference (a PNG) when the sizes agree."""
    a, b = Image.open(io.BytesIO(v2_png)), Image.open(io.BytesIO(v3_png))
    a.load()
    b.load()
    sizes, modes = (a.size, b.size), (a.mode, b.mode)
    if a.size != b.size:
        return _verdict("the sizes differ: V2 {} x {}, the translation {} x {}".format(*a.size, *b.size),
                        approximated, sizes=sizes, modes=modes), None
    x, y = _pixels(a), _pixels(b)
    psnr, ssim = peak_snr(x, y), structural_similarity(_luma(x), _luma(y))
    heat = heat_map(x, y)
    if a.mode != b.mode:
        return _verdict(f"the modes differ: V2 {a.mode}, the translation {b.mode}", approximated, psnr, ssim,
                        sizes, modes), heat
    if psnr >= thresholds.min_psnr and ssim >= thresholds.min_ssim:
        return Comparison("match", "the same image", psnr, ssim, sizes, modes), heat
    return _verdict(f"the pixels differ: PSNR {psnr:.1f} dB (at least {thresholds.min_psnr:g}), "
                    f"SSIM {ssim:.4f} (at least {thresholds.min_ssim:g})", approximated, psnr, ssim, sizes, modes), heat


def _verdict(why: str, approximated: tuple[str, ...], psnr: float | None = None, ssim: float | None = None,
             sizes=None, modes=None) -> Comparison:
    if approximated:
        return Comparison("explained", f"{why}; the translation approximates {', '.join(approximated)}",
                          psnr, ssim, sizes, modes, approximated)
    return Comparison("mismatch", why, psnr, ssim, sizes, modes)


def _pixels(image: Image.Image) -> np.ndarray:
    """RGB(A) as float32 H x W x C; other modes as RGB (what a viewer shows)."""
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    return np.asarray(image, dtype=np.float32)


def _luma(x: np.ndarray) -> np.ndarray:
    return x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114


def peak_snr(x: np.ndarray, y: np.ndarray) -> float:
    channels = min(x.shape[-1], y.shape[-1])
    mse = float(np.mean((x[..., :channels] - y[..., :channels]) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(_L * _L / mse)


def _gaussian_blur(x: np.ndarray, size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """A separable Gaussian filter, 'valid' part only (as in the SSIM paper's evaluation)."""
    taps = np.exp(-((np.arange(size) - size // 2) ** 2) / (2 * sigma * sigma))
    taps = (taps / taps.sum()).astype(x.dtype)
    rows = sliding_window_view(x, size, axis=1) @ taps  # a view: no copy of the image per tap
    return sliding_window_view(rows, size, axis=0) @ taps


def structural_similarity(x: np.ndarray, y: np.ndarray) -> float:
    """Mean SSIM of two grey images; an image under the window's size is compared whole."""
    if min(x.shape) < 11:
        mx, my = x.mean(), y.mean()
        vx, vy, cov = x.var(), y.var(), float(np.mean((x - mx) * (y - my)))
        return float(((2 * mx * my + _C1) * (2 * cov + _C2)) / ((mx * mx + my * my + _C1) * (vx + vy + _C2)))
    mx, my = _gaussian_blur(x), _gaussian_blur(y)
    vx = _gaussian_blur(x * x) - mx * mx
    vy = _gaussian_blur(y * y) - my * my
    cov = _gaussian_blur(x * y) - mx * my
    ssim = ((2 * mx * my + _C1) * (2 * cov + _C2)) / ((mx * mx + my * my + _C1) * (vx + vy + _C2))
    return float(ssim.mean())


def heat_map(x: np.ndarray, y: np.ndarray) -> bytes:
    """Where the two differ: black where equal, through red to yellow at the largest difference."""
    channels = min(x.shape[-1], y.shape[-1], 3)
    diff = np.abs(x[..., :channels] - y[..., :channels]).max(axis=-1)
    scaled = diff / diff.max() if diff.max() > 0 else diff
    rgb = np.stack([np.clip(scaled * 2, 0, 1), np.clip(scaled * 2 - 1, 0, 1), np.zeros_like(scaled)], axis=-1)
    out = io.BytesIO()
    Image.fromarray((rgb * 255).astype(np.uint8), "RGB").save(out, "PNG", compress_level=1)
    return out.getvalue()
