"""The V3 contract as the emulator enforces it: request bodies, error reasons, image limits."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl

MAX_SIDE = 2048
MAX_BYTES = 30 * 1024 * 1024

# reason -> HTTP status, from the V3 error-code page
ERROR_STATUS = {
    "MISSING_API_KEY": 400,
    "INVALID_API_KEY": 403,
    "FAILED_TO_AUTH": 401,
    "BILLING_BALANCE_NOT_ENOUGH": 400,
    "NOT_ENOUGH_BALANCE": 403,
    "INVALID_REQUEST_BODY": 400,
    "INVALID_IMAGE_FORMAT": 400,
    "IMAGE_FILE_EXCEEDS_MAX_SIZE": 400,
    "IMAGE_EXCEEDS_MAX_RESOLUTION": 400,
    "INVALID_IMAGE_SIZE": 400,
    "ILLEGAL_IMAGE_CONTENT": 400,
    "FEATURE_NOT_ALLOWED": 403,
    "API_NOT_ALLOWED": 403,
    "RATE_LIMIT_EXCEEDED": 429,
    "TASK_NOT_FOUND": 404,
    "SERVICE_NOT_AVAILABLE": 503,
    "CREATE_TASK_FAILED": 500,
    "GET_RESULT_FAILED": 500,
    "TASK_FAILED": 500,
    "BILLING_FAILED": 500,
}


class V3Error(Exception):
    def __init__(self, reason: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = status or ERROR_STATUS.get(reason, 500)

    def body(self) -> dict:
        return {"code": self.status, "reason": self.reason, "message": self.message, "metadata": {}}


class UpscaleRequest(BaseModel):
    model_name: Literal["RealESRGAN_x4plus_anime_6B", "RealESRNet_x4plus", "4x-UltraSharp"]
    image_base64: str = Field(min_length=1)
    scale_factor: float = Field(gt=1, le=4)


class Webhook(BaseModel):
    # V3 POSTs the task's result here once it is final; other keys (V3's test_mode) are ignored
    url: HttpUrl  # http or https only: anything else is an INVALID_REQUEST_BODY


class Extra(BaseModel):
    response_image_type: Literal["png", "webp", "jpeg"] = "png"
    enable_nsfw_detection: bool = False
    nsfw_detection_level: Literal[0, 1, 2] | None = None
    webhook: Webhook | None = None
    custom_storage: dict | None = None
    enterprise_plan: dict | None = None


class UpscaleBody(BaseModel):
    model_config = ConfigDict(strict=False)

    extra: Extra = Extra()
    request: UpscaleRequest
