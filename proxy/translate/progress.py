"""V3 task result -> the V2 progress `data` (spec section 2): every field, always present."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from functools import lru_cache

from proxy.errors import is_final
from proxy.redact import redact
from proxy.v3.models import TaskResult


def v2_time(ms: int) -> str:
    """Epoch ms -> `YYYY-MM-DD HH:MM:SS` in UTC; "" when unknown."""
    return _v2_time(ms // 1000) if ms > 0 else ""


@lru_cache(maxsize=4096)  # the same few seconds recur in every poll of a task
def _v2_time(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _number(x: float) -> float | int:
    """1 rather than 1.0, as V2's own encoder wrote whole numbers."""
    return int(x) if float(x).is_integer() else x


def _progress(status: int, final: bool, result: TaskResult, now_ms: int) -> float:
    if final:
        return 1
    if result.task.progress_percent > 0:
        return min(result.task.progress_percent / 100, 0.99)
    started = result.extra.debug_info.execute_time_ms
    eta = result.task.eta
    if status == 1 and started > 0 and eta > 0:  # elapsed share of elapsed + remaining
        elapsed = max(now_ms - started, 0) / 1000
        return _number(round(min(elapsed / (elapsed + eta), 0.99), 2))
    return 0


def v2_progress(*, status: int, progress: float, eta: float, imgs: list[str] | None, failed_reason: str,
                submit_ms: int, execution_ms: int, finish_ms: int, nsfw: bool = False,
                nsfw_results: list[dict] | None = None) -> dict:
    """The V2 progress `data`, every field present (legacy decoders fail on a missing one)."""
    return {
        "status": status,
        "progress": progress,
        "eta_relative": eta,
        "imgs": imgs,
        "failed_reason": failed_reason,
        "current_images": [],
        "submit_time": v2_time(submit_ms),
        "execution_time": v2_time(execution_ms),
        "txt2img_time": v2_time(finish_ms),
        "finish_time": v2_time(finish_ms),
        "info": "",
        "enable_nsfw_detection": nsfw,
        "nsfw_detection_result": nsfw_results or [],
        "debug_info": {
            "submit_time_ms": submit_ms,
            "execution_time_ms": execution_ms,
            "txt2img_time_ms": finish_ms,
            "finish_time_ms": finish_ms,
        },
    }


def failed_progress(reason: str, *, submit_ms: int = 0, execution_ms: int = 0, finish_ms: int = 0) -> dict:
    """A final failure (status 3) as V2 progress data: the `data` of a poll that ends in an error,
    so that an SDK's wait loop, which reads `data.status` whatever the code, stops with the reason
    instead of crashing on `data: null`."""
    return v2_progress(status=3, progress=0, eta=0, imgs=None, failed_reason=reason,
                       submit_ms=submit_ms, execution_ms=execution_ms, finish_ms=finish_ms)


def progress_data(result: TaskResult, status_table: dict[str, int], now_ms: int | None = None,
                  key: str | None = None) -> dict:
    """A V3 task result as V2 progress (the direct path); `key`, the caller's, is scrubbed from what
    V3 wrote (its failure reason)."""
    status = status_table.get(result.task.status, 1)  # unknown: still running
    final = is_final(status)
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    times = result.extra.debug_info
    images = result.images or []
    nsfw = result.extra.enable_nsfw_detection
    return v2_progress(
        status=status,
        progress=_progress(status, final, result, now_ms),
        eta=0 if final else _number(max(result.task.eta, 0)),
        imgs=[img.image_url for img in images] if status == 2 else None,
        failed_reason=redact(result.task.reason, key) if status == 3 else "",
        submit_ms=times.submit_time_ms, execution_ms=times.execute_time_ms, finish_ms=times.complete_time_ms,
        nsfw=nsfw,
        nsfw_results=[
            {"valid": img.nsfw_detection_result.valid, "confidence": _number(img.nsfw_detection_result.confidence)}
            for img in images if nsfw and img.nsfw_detection_result is not None
        ],
    )
