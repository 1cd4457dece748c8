"""Settings of the V3 emulator: environment variables UPSCALE_PROXY_EMULATOR_*."""

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from proxy.envtypes import CommaList, split_commas

Endpoint = Literal["submit", "result", "image"]


class EmulatorSettings(BaseSettings):
    """How the emulated V3 behaves. Defaults make a fast, healthy, key-agnostic upstream."""

    model_config = SettingsConfigDict(env_prefix="UPSCALE_PROXY_EMULATOR_", extra="forbid")

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(9090, ge=0, le=65535, description="port to listen on (0: any free port)")
    public_url: str | None = Field(
        None, description="base URL put into image_url (default: the address the request came to)"
    )
    queue_delay: float = Field(0.1, ge=0, le=3600, description="seconds a task stays QUEUED")
    process_delay: float = Field(0.2, ge=0, le=3600, description="seconds a task stays PROCESSING")
    image_url_ttl: int = Field(3600, ge=1, description="seconds an image_url keeps working")
    api_keys: CommaList = Field(
        default_factory=list,
        description="accepted keys, comma-separated (empty: any non-empty key is accepted)",
    )
    webhooks: bool = Field(True, description="POST finished tasks to their extra.webhook.url")
    webhook_retry_delay: float = Field(
        1.0, ge=0, le=60, description="seconds before the first webhook retry (doubling after)"
    )
    # fault injection, for tests of the proxy's error handling
    latency: float = Field(0, ge=0, le=600, description="seconds added before every V3 reply")
    error_reason: str | None = Field(
        None, description="inject this V3 error reason (or GATEWAY_TIMEOUT for a bare 504)"
    )
    error_rate: float = Field(1.0, ge=0, le=1, description="fraction of calls that get error_reason")
    error_limit: int | None = Field(None, ge=0, description="inject at most this many errors")
    error_endpoints: Annotated[list[Endpoint], NoDecode, BeforeValidator(split_commas)] = Field(
        default_factory=lambda: ["submit", "result"], description="where errors are injected"
    )
    fail_rate: float = Field(0, ge=0, le=1, description="fraction of tasks that end FAILED")
    fail_reason: str = Field("upscale failed (injected by the emulator)")
    seed: int | None = Field(None, description="seed of the fault-injection dice")
