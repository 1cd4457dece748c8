"""A V3 task result -> V2 progress `data` (spec sections 2 and 5), on the direct path."""

import pytest

from proxy import mappings
from proxy.translate.progress import progress_data
from proxy.v3.models import TaskResult

STATUS = mappings.load().task_status
SUBMIT_MS, EXECUTE_MS, COMPLETE_MS = 1706080097101, 1706080097369, 1706080102479
V2_DATA_FIELDS = {"status", "progress", "eta_relative", "imgs", "failed_reason", "current_images", "submit_time",
                  "execution_time", "txt2img_time", "finish_time", "info", "enable_nsfw_detection",
                  "nsfw_detection_result", "debug_info"}


def result(status: str, *, images: list[dict] | None = None, nsfw: bool = False, times=None, **task) -> TaskResult:
    submit, execute, complete = times or (str(SUBMIT_MS), str(EXECUTE_MS), "0")
    return TaskResult.model_validate({
        "extra": {"enable_nsfw_detection": nsfw,
                  "debug_info": {"request_info": "", "submit_time_ms": submit, "execute_time_ms": execute,
                                 "complete_time_ms": complete}},
        "task": {"task_id": "t", "task_type": "UPSCALE", "status": status, "reason": "", "eta": 0,
                 "progress_percent": 0, **task},
        "images": images, "videos": [], "audios": [],
    })


def image(url: str, nsfw: dict | None = None) -> dict:
    return {"image_url": url, "image_url_ttl": "3600", "image_type": "png", "nsfw_detection_result": nsfw}


def test__queued__is_status_0_with_every_v2_field():
    data = progress_data(result("TASK_STATUS_QUEUED", eta=7), STATUS, now_ms=SUBMIT_MS + 100)
    assert set(data) == V2_DATA_FIELDS
    assert (data["status"], data["progress"], data["eta_relative"], data["imgs"]) == (0, 0, 7, None)
    assert data["submit_time"] == "2024-01-24 07:08:17" and data["finish_time"] == ""
    assert data["current_images"] == [] and data["info"] == "" and data["failed_reason"] == ""


def test__processing__estimates_progress_from_elapsed_and_eta():
    data = progress_data(result("TASK_STATUS_PROCESSING", eta=3), STATUS, now_ms=EXECUTE_MS + 3000)
    assert data["status"] == 1 and data["progress"] == 0.5 and data["eta_relative"] == 3


def test__processing__with_a_percentage__uses_it_below_1():
    assert progress_data(result("TASK_STATUS_PROCESSING", progress_percent=40), STATUS, now_ms=0)["progress"] == 0.4
    assert progress_data(result("TASK_STATUS_PROCESSING", progress_percent=100), STATUS, now_ms=0)["progress"] == 0.99


@pytest.mark.parametrize("status", ["TASK_STATUS_UNKNOWN", "TASK_STATUS_SOMETHING_NEW"])
def test__unknown_statuses__are_running(status):
    assert progress_data(result(status), STATUS, now_ms=EXECUTE_MS)["status"] == 1


def test__succeeded__is_status_2_done_with_the_image_urls_and_times():
    done = result("TASK_STATUS_SUCCEED", eta=4, images=[image("https://img/a.png"), image("https://img/b.png")],
                  times=(SUBMIT_MS, EXECUTE_MS, COMPLETE_MS))
    data = progress_data(done, STATUS, now_ms=COMPLETE_MS + 10)
    assert (data["status"], data["progress"], data["eta_relative"]) == (2, 1, 0)
    assert data["imgs"] == ["https://img/a.png", "https://img/b.png"]
    assert (data["execution_time"], data["finish_time"], data["txt2img_time"]) == (
        "2024-01-24 07:08:17", "2024-01-24 07:08:22", "2024-01-24 07:08:22")
    assert data["debug_info"] == {"submit_time_ms": SUBMIT_MS, "execution_time_ms": EXECUTE_MS,
                                  "txt2img_time_ms": COMPLETE_MS, "finish_time_ms": COMPLETE_MS}
    assert data["enable_nsfw_detection"] is False and data["nsfw_detection_result"] == []


def test__failed__is_status_3_with_the_reason_and_no_images():
    data = progress_data(result("TASK_STATUS_FAILED", reason="model crashed", images=[image("https://img/x")]),
                         STATUS, now_ms=EXECUTE_MS)
    assert (data["status"], data["progress"], data["eta_relative"]) == (3, 1, 0)
    assert data["failed_reason"] == "model crashed" and data["imgs"] is None


def test__debug_times__as_strings_or_ints__read_the_same():
    as_strings = result("TASK_STATUS_SUCCEED", times=(str(SUBMIT_MS), str(EXECUTE_MS), str(COMPLETE_MS)))
    as_ints = result("TASK_STATUS_SUCCEED", times=(SUBMIT_MS, EXECUTE_MS, COMPLETE_MS))
    assert progress_data(as_strings, STATUS, now_ms=0) == progress_data(as_ints, STATUS, now_ms=0)


def test__nsfw_detection__one_result_per_image_when_on():
    images = [image("https://img/a", {"valid": True, "confidence": 0.25}),
              image("https://img/b", {"valid": False, "confidence": 1.0})]
    done = result("TASK_STATUS_SUCCEED", nsfw=True, images=images)
    data = progress_data(done, STATUS, now_ms=0)
    assert data["enable_nsfw_detection"] is True
    assert data["nsfw_detection_result"] == [{"valid": True, "confidence": 0.25}, {"valid": False, "confidence": 1}]
