"""Proxy settings: environment variables UPSCALE_PROXY_*, overridden by command-line options.

Validated once at start-up; a bad value stops the boot with a message naming the setting.
"""

from typing import Literal

from pydantic import Field, HttpUrl, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_UPSTREAM = "https://api.novita.ai"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UPSCALE_PROXY_", extra="forbid")

    host: str = Field("127.0.0.1", description="address the proxy listens on")
    port: int = Field(8080, ge=0, le=65535, description="port the proxy listens on")
    upstream: str = Field(DEFAULT_UPSTREAM, description="base URL of the V3 API")
    emulate_v3: bool = Field(
        False, description="run the built-in V3 emulator in-process and use it as the upstream"
    )
    upstream_connect_timeout: float = Field(
        5.0, gt=0, le=300, description="seconds to open a connection to the upstream"
    )
    upstream_timeout: float = Field(
        60.0, gt=0, le=3600, description="seconds for a whole upstream call, body upload included"
    )
    upstream_retries: int = Field(
        2, ge=0, le=5, description="retries of an upstream GET after a connection error or 5xx"
    )
    upstream_retry_backoff: float = Field(
        0.1, ge=0, le=10, description="first retry delay in seconds; doubles, with full jitter"
    )
    upstream_max_connections: int = Field(
        100, ge=1, le=10000, description="size of the keep-alive pool to the upstream"
    )
    max_body_mb: int = Field(
        48, ge=1, le=512,
        description="largest V2 request body accepted, in MiB (V3 takes images up to 30 MB)",
    )
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="json lines, or a console renderer; auto picks console on a terminal"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info")

    @field_validator("upstream")
    @classmethod
    def _http_url(cls, value: str) -> str:
        url = HttpUrl(value)  # raises with a clear message for anything that is not http(s)
        if url.query or url.fragment:
            raise ValueError("the upstream is a base URL: no query or fragment")
        return str(url).rstrip("/")
