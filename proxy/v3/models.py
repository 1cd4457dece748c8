"""V3 replies as the proxy reads them (spec sections 4-6): liberal in what they accept.

Epoch-ms times come as strings or ints, `image_url_ttl` as an int or a string; fields the proxy
does not use are ignored, so a V3 that adds fields does not break the proxy.
"""

from pydantic import BaseModel, ConfigDict, Field


class _Reply(BaseModel):
    model_config = ConfigDict(extra="ignore")


class DebugInfo(_Reply):
    submit_time_ms: int = 0
    execute_time_ms: int = 0
    complete_time_ms: int = 0


class ResultExtra(_Reply):
    enable_nsfw_detection: bool = False
    debug_info: DebugInfo = Field(default_factory=DebugInfo)


class NsfwResult(_Reply):
    valid: bool = False
    confidence: float = 0.0


class ResultImage(_Reply):
    image_url: str
    image_url_ttl: int = 3600
    image_type: str = "png"
    nsfw_detection_result: NsfwResult | None = None


class Task(_Reply):
    task_id: str
    status: str
    reason: str = ""
    eta: float = 0
    progress_percent: float = 0


class TaskResult(_Reply):
    """GET /v3/async/task-result"""

    extra: ResultExtra = Field(default_factory=ResultExtra)
    task: Task
    images: list[ResultImage] | None = None


class SubmitReply(_Reply):
    """POST /v3/async/upscale"""

    task_id: str = Field(min_length=1)


class ErrorBody(_Reply):
    code: int | None = None
    reason: str = ""
    message: str = ""
