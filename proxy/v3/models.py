"""V3 replies as the proxy reads them (spec sections 4-6): liberal in what they accept.

Epoch-ms times come as strings or ints, `image_url_ttl` as an int or a string; fields the proxy
does not use are ignored, so a V3 that adds fields does not break the proxy.

These are msgspec Structs, not pydantic models: a task result is read on every poll, and msgspec
reads one in a fifth of pydantic's time (tests/bench). They keep pydantic's method names
(`model_validate_json`, `model_validate`, `model_dump_json`), so callers read the same, and a reply
that can't be read raises `BadReply`, a ValueError.
"""

from __future__ import annotations

from typing import Annotated, Any, Self

import msgspec


class BadReply(ValueError):
    """A V3 document that is not what its type says."""


class _Reply(msgspec.Struct):
    @classmethod
    def model_validate_json(cls, data: bytes | str) -> Self:
        try:
            return _decoder(cls).decode(data)
        except msgspec.DecodeError as e:  # ValidationError too: it is a DecodeError
            raise BadReply(str(e)) from e

    @classmethod
    def model_validate(cls, obj: Any) -> Self:
        try:
            return msgspec.convert(obj, cls, strict=False)
        except msgspec.ValidationError as e:
            raise BadReply(str(e)) from e

    def model_dump_json(self) -> str:
        return msgspec.json.encode(self).decode()


_DECODERS: dict[type, msgspec.json.Decoder] = {}


def _decoder(cls: type) -> msgspec.json.Decoder:
    decoder = _DECODERS.get(cls)
    if decoder is None:
        decoder = _DECODERS[cls] = msgspec.json.Decoder(cls, strict=False)  # "12" is 12, as V3 sends it
    return decoder


class DebugInfo(_Reply):
    submit_time_ms: int = 0
    execute_time_ms: int = 0
    complete_time_ms: int = 0


class ResultExtra(_Reply):
    enable_nsfw_detection: bool = False
    debug_info: DebugInfo = msgspec.field(default_factory=DebugInfo)


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

    task: Task
    extra: ResultExtra = msgspec.field(default_factory=ResultExtra)
    images: list[ResultImage] | None = None


class SubmitReply(_Reply):
    """POST /v3/async/upscale"""

    task_id: Annotated[str, msgspec.Meta(min_length=1)]

