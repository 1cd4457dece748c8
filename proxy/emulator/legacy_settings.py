"""Settings of the legacy V2 emulator: environment variables UPSCALE_PROXY_LEGACY_*."""

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from proxy.emulator.a1111 import ReleaseLine
from proxy.envtypes import CommaList, split_commas

LegacyEndpoint = Literal["upscale", "progress", "image"]
V2_ERROR_CODES = (-1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10)  # spec section 3


class LegacySettings(BaseSettings):
    """How the emulated legacy V2 behaves. Defaults make a fast, healthy, key-agnostic V2 running
    the A1111 release line the proxy assumes by default. Tests may change any of them at run time
    (`app[LEGACY_V2].settings.error_code = 5`)."""

    model_config = SettingsConfigDict(env_prefix="UPSCALE_PROXY_LEGACY_", extra="forbid")

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(9091, ge=0, le=65535, description="port to listen on (0: any free port)")
    public_url: str | None = Field(
        None, description="base URL put into imgs (default: the address the request came to)"
    )
    a1111_profile: ReleaseLine = Field("v1.3", description="the AUTOMATIC1111 release line V2 ran")
    queue_delay: float = Field(0.1, ge=0, le=3600, description="seconds a task stays at status 0")
    process_delay: float = Field(0.2, ge=0, le=3600, description="seconds a task stays at status 1 (at least)")
    image_ttl: int = Field(
        3600, ge=1, le=604800, description="seconds a result image stays downloadable when img_expire_ttl is 0 or null"
    )
    api_keys: CommaList = Field(
        default_factory=list,
        description="accepted keys, comma-separated (empty: any non-empty key is accepted)",
    )
    # fault injection, for tests of the proxy's legacy side
    latency: float = Field(0, ge=0, le=600, description="seconds added before every reply")
    error_code: int | None = Field(None, description="inject this V2 code (HTTP 200, data null)")
    error_rate: float = Field(1.0, ge=0, le=1, description="fraction of calls that get error_code")
    error_limit: int | None = Field(None, ge=0, description="inject at most this many errors")
    error_endpoints: Annotated[list[LegacyEndpoint], NoDecode, BeforeValidator(split_commas)] = Field(
        default_factory=lambda: ["upscale", "progress"],
        description="where errors are injected (an image gets HTTP 503)",
    )
    fail_rate: float = Field(0, ge=0, le=1, description="fraction of tasks that end with status 3")
    fail_reason: str = Field("upscale failed (injected by the emulator)")
    seed: int | None = Field(None, description="seed of the fault-injection dice")
    # V2 removed: what the proxy must fall forward from
    gone: int | None = Field(
        None, description="answer /v2/upscale and /v2/progress with this HTTP status, as a removed API would"
    )
    gone_format: Literal["text", "json"] = Field(
        "text", description="the body of a gone reply: plain text, or a JSON error (not V2's envelope)"
    )

    @field_validator("error_code")
    @classmethod
    def _v2_code(cls, value: int | None) -> int | None:
        if value is not None and value not in V2_ERROR_CODES:
            raise ValueError(f"must be a V2 error code: {', '.join(map(str, V2_ERROR_CODES))}")
        return value

    @field_validator("gone")
    @classmethod
    def _gone_status(cls, value: int | None) -> int | None:
        if value not in (None, 404, 410):
            raise ValueError("must be 404 or 410")
        return value
