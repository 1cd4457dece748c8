"""Proxy settings: environment variables UPSCALE_PROXY_*, overridden by command-line options.

Validated once at start-up; a bad value stops the boot with a message naming the setting.
"""

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    Field,
    FiniteFloat,
    HttpUrl,
    SecretStr,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from proxy.envtypes import CommaList, JsonDict, JsonList, host_name
from proxy.migration.stages import Rules
from proxy.translate.features import REGISTRY, Policy
from proxy.translate.profiles import DEFAULT_PROFILE, PROFILES, ProfileName

DEFAULT_UPSTREAM = "https://api.novita.ai"


class Brownout(BaseModel):
    """A window in which V2 calls are refused (code 10), all of them or a fraction."""

    start: AwareDatetime
    end: AwareDatetime
    fraction: float = Field(1.0, ge=0, le=1)
    allow: list[str] = Field(default_factory=list, description="key fingerprints exempt from it")

    @model_validator(mode="after")
    def _ordered(self) -> "Brownout":
        if self.end <= self.start:
            raise ValueError(f"a brownout must end after it starts ({self.start} .. {self.end})")
        return self


# one UPSCALE_PROXY_POLICY_<NAME> per feature unit, generated from the registry
_PolicySettings = create_model(
    "_PolicySettings", __base__=BaseSettings,
    **{f"policy_{unit.name}": (Policy | None, Field(None, description=unit.summary())) for unit in REGISTRY},
)


class Settings(_PolicySettings):
    model_config = SettingsConfigDict(env_prefix="UPSCALE_PROXY_", extra="forbid")

    host: str = Field("127.0.0.1", description="address the proxy listens on")
    port: int = Field(8080, ge=0, le=65535, description="port the proxy listens on")
    upstream: str = Field(DEFAULT_UPSTREAM, description="base URL of the V3 API")
    emulate_v3: bool = Field(
        False, description="run the built-in V3 emulator in-process and use it as the upstream"
    )
    emulate_v2: bool = Field(
        False, description="run the legacy V2 emulator in-process and use it as v2_upstream (one process only)"
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
    # circuit breaker
    breaker_failures: int = Field(
        5, ge=0, le=1000, description="failures in a row that say V3 is down (no connection, a timeout, "
        "502/503/504) before calls fail fast with code 5 (0: never)",
    )
    breaker_window: float = Field(
        30.0, gt=0, le=3600, description="seconds within which those failures must fall"
    )
    breaker_cooldown: float = Field(
        10.0, gt=0, le=3600, description="seconds calls fail fast before one probe call tries V3 again"
    )
    max_body_mb: int = Field(
        48, ge=1, le=512,
        description="largest V2 request body accepted, in MiB (V3 takes images up to 30 MB)",
    )
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="json lines, or a console renderer; auto picks console on a terminal"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info")
    # drain
    drain_delay: float = Field(
        5.0, ge=0, le=600, description="seconds after SIGTERM or SIGINT during which /readyz answers 503 while "
        "everything is still served, so that load balancers move away first; then the listener closes",
    )
    shutdown_grace: float = Field(
        20.0, gt=0, le=3600, description="seconds requests in flight get to finish once the listener is closed; "
        "then they are cancelled",
    )

    # limits
    request_timeout: float = Field(
        60.0, gt=0, le=3600, description="seconds a V2 submission's whole body may take to arrive; past it, "
        "code 9, and what came is freed",
    )
    max_inflight_mb: int = Field(
        256, ge=1, le=65536, description="MiB of V2 submission bodies in flight across the process; a submission "
        "that would go past it gets code 5 at once, before its body is read",
    )
    max_upstream_calls: int = Field(
        64, ge=1, le=10000, description="V2 submissions waiting on V3 at once; past it, code 5 at once (keep it "
        "under UPSCALE_PROXY_UPSTREAM_MAX_CONNECTIONS, so that polls always find a connection)",
    )
    memory_trim_interval: float = Field(
        10.0, ge=0, le=3600, description="seconds between returns of freed memory to the OS (glibc malloc_trim) "
        "while no submission is in flight (0: never)",
    )

    # the composed path
    data_dir: Path = Field(Path("data"), description="where composed tasks and their images are kept")
    public_url: str | None = Field(
        None, description="the proxy's base URL as clients reach it, for composed image URLs"
    )
    image_hosts: CommaList = Field(
        default_factory=list, description="hosts V3 result images may be fetched from, besides the upstream's"
    )
    # boundaries
    image_origins: CommaList = Field(
        default_factory=list, description="origins (scheme://host[:port]) V3 result images may be fetched from, "
        "besides the upstream's own",
    )
    image_private_addresses: bool = Field(
        False, description="let configured image origins and hosts whose names resolve to loopback, private or "
        "link-local addresses be fetched from",
    )

    @field_validator("image_origins", "image_hosts")
    @classmethod
    def _image_origins(cls, values: list[str], info: ValidationInfo) -> list[str]:
        from proxy.compose import fetch  # loaded only when the setting is given

        parse = fetch.parse_origin if info.field_name == "image_origins" else fetch.parse_host
        for value in values:
            parse(value)  # a ValueError names the entry
        return values

    image_fetch_timeout: float = Field(60.0, gt=0, le=3600)
    image_max_mb: int = Field(256, ge=1, le=4096, description="largest V3 result image fetched, in MiB")
    compose_workers: int = Field(2, ge=1, le=64, description="threads for local image work")
    compose_max_pending: int = Field(8, ge=1, le=1024, description="compositions at once per process")
    compose_deadline: FiniteFloat = Field(900.0, gt=0, description="seconds until a composed task times out")
    compose_max_tasks: int = Field(
        1000, ge=1, le=1_000_000, description="composed tasks running at once, counted in the task store (so "
        "across every process and replica on it); each keeps its input image until it is composed. Past it, a "
        "composed submission gets code 5 before anything is sent to V3",
    )
    png_compress_level: int = Field(
        4, ge=0, le=9, description="zlib level of the composed PNGs (0: none, 1: fastest, 9: smallest); 4 makes "
        "files within 5% of level 6's (Pillow's default, V2's) in under half its time on a 2048 x 2048 photo",
    )
    webhooks: bool = Field(
        False, description="ask V3 to POST finished tasks to this proxy (needs UPSCALE_PROXY_PUBLIC_URL, "
        "reachable from V3)",
    )
    webhook_fallback: float = Field(
        30.0, gt=0, le=3600, description="with webhooks: seconds after which the proxy asks V3 about a task "
        "whose webhook has not come",
    )
    task_lease: float = Field(
        60.0, gt=0, le=3600,
        description="seconds a process may hold a composed task while moving it a step; a dead process's "
        "tasks are taken over after it",
    )
    sweep_interval: FiniteFloat = Field(60.0, gt=0, description="seconds between sweeps of expired tasks")
    fingerprint_secret: SecretStr | None = Field(
        None, description="HMAC secret of key fingerprints (default: made once, kept in data_dir)"
    )

    # redis
    redis_url: SecretStr | None = Field(
        None, description="redis:// or rediss:// URL of the Redis that replicas share for composed tasks, their "
        "leases and their images (unset: SQLite and files in data_dir); needs UPSCALE_PROXY_FINGERPRINT_SECRET",
    )
    redis_prefix: str = Field(
        "upscale-v2-proxy:", min_length=1, max_length=200,
        description="prefix of every Redis key: proxies with the same URL and prefix share their tasks",
    )
    redis_timeout: float = Field(
        5.0, gt=0, le=300, description="seconds to connect to Redis, and for one Redis command",
    )

    # direct-path polls (proxy/v2/poll_cache.py)
    poll_cache_seconds: float = Field(
        1.0, ge=0, le=60, description="seconds a running direct task's V3 result answers polls (0: off)"
    )
    poll_outage_grace: float = Field(
        300.0, gt=0, le=86400, description="seconds a task's polls ride through V3 (or the task store) being "
        "unreachable with its last known state; past it, the task ends as failed (status 3) with the reason",
    )
    upstream_poll_timeout: float = Field(
        10.0, gt=0, le=3600, description="seconds for one V3 task-result call; past it, a poll answers the "
        "task's last known state",
    )
    poll_cache_max_entries: int = Field(
        100_000, ge=0, le=10_000_000,
        description="direct-task results kept for polls, least recently used dropped first (0: no cache, "
        "no shared calls)",
    )

    # the end of V2: signalled on every V2 response, enforced by brownouts
    deprecation_date: AwareDatetime = Field(
        datetime(2024, 1, 24, tzinfo=UTC), description="when V2 was deprecated (the Deprecation header)"
    )
    sunset_date: AwareDatetime | None = Field(None, description="when V2 stops (the Sunset header)")
    deprecation_link: str = Field("/_proxy/guide", description="the migration guide (Link rel=deprecation)")
    successor_url: str | None = Field(
        None, description="base URL of V3 for Link rel=successor-version (default: this proxy's /v3)"
    )
    brownouts: JsonList[Brownout] = Field(default_factory=list, description="JSON list of brownout windows")
    metrics_max_clients: int = Field(
        100, ge=0, le=10000, description="key fingerprints with their own metrics series; the rest are 'other'"
    )

    # the operator's side: the usage store and its dashboard (proxy/usage)
    usage_retention_days: int = Field(
        400, ge=1, le=3660, description="days of hourly usage counts kept; older hours are pruned"
    )
    migrated_after_days: int = Field(
        30, ge=1, le=365, description="days without a V2 call after which a client that calls V3 counts as "
        "migrated (and one that calls nothing as quiet)"
    )
    client_labels: JsonDict = Field(
        default_factory=dict, description="JSON object: key fingerprint -> a readable name, shown wherever the "
        "fingerprint is (the admin API's names take precedence)"
    )
    # gradual migration: the legacy V2 side by side (proxy/migration)
    v2_upstream: str | None = Field(
        None, description="base URL of the legacy V2 API; set, each client is served by the side its stage says "
        "(unset: every call is translated)"
    )
    migration_file: Path | None = Field(
        None, description="TOML file of the clients' stages (legacy, shadow, canary, translated) and the default"
    )
    allow_route_header: bool = Field(
        False, description="every client may force a side per call with X-Upscale-Proxy-Route: legacy | v3 (else "
        "only clients whose rule allows it)"
    )
    route_ttl: float = Field(
        7 * 86400, gt=0, le=30 * 86400, description="seconds the side that took a task is remembered for its polls"
    )
    v2_gone_after: float = Field(
        3600.0, gt=0, le=30 * 86400, description="seconds the legacy V2 may stay unreachable before it is taken to be "
        "gone and every client is translated (a 404 or 410 to an upscale says so at once)"
    )
    shadow_max_per_minute: int = Field(
        10, ge=0, le=100000, description="shadow comparisons started per minute and process, at most (each costs "
        "the translation's V3 jobs)"
    )
    shadow_fraction: float = Field(1.0, ge=0, le=1, description="share of the calls of a client in shadow (or of a "
                                   "canary's V2 share) that are shadowed, within the per-minute cap")
    shadow_noise_every: int = Field(
        20, ge=0, le=100000, description="every Nth shadow also sends its body to V2 twice, to measure how far V2 "
        "differs from itself (0: never)"
    )
    shadow_min_psnr: float = Field(40.0, ge=0, le=100, description="PSNR (dB) at or above which two images match")
    shadow_min_ssim: float = Field(0.98, ge=0, le=1, description="SSIM at or above which two images match")
    rollback_window: int = Field(20, ge=1, le=10000, description="the last calls (and comparisons) of a client a "
                                 "rollback is judged on")
    rollback_min_calls: int = Field(5, ge=1, le=10000, description="calls in the window before a rollback is judged")
    rollback_max_failure_rate: float = Field(
        0.2, ge=0, le=1, description="share of a canary or translated client's translated calls that may fail "
        "before it steps back a stage"
    )
    rollback_max_mismatch_rate: float = Field(
        0.2, ge=0, le=1, description="share of a canary or translated client's shadow comparisons that may "
        "mismatch before it steps back a stage"
    )
    rollback_hold: float = Field(86400.0, ge=0, le=365 * 86400, description="seconds a client that was rolled back "
                                 "is not promoted again")
    promote_after: int = Field(0, ge=0, le=100000, description="matching shadow comparisons in a row after which a "
                               "client in shadow steps forward to canary (0: never on its own)")
    promote_percent: int = Field(10, ge=0, le=100, description="the canary share of a client promoted from shadow")
    admin_token: SecretStr | None = Field(
        None, description="token of the dashboard, /_proxy/usage and the admin API (Bearer, or the login form); "
        "unset: one is made at start and the log line announcing the dashboard carries its URL"
    )

    # exactly which V2: the A1111 release line, and what to do with each feature V3 lacks
    a1111_profile: ProfileName = Field(
        DEFAULT_PROFILE, description="the AUTOMATIC1111 release line whose extras V2 reproduces"
    )
    policy: Policy | None = Field(
        None, description="policy of every feature that allows it and has no policy of its own (unset: each "
        "feature's default)"
    )
    face_restorer_url: str | None = Field(
        None, description="base URL of an A1111-compatible server for GFPGAN/CodeFormer (e.g. http://gpu:7860)"
    )
    face_restorer_timeout: float = Field(120.0, gt=0, le=3600, description="seconds for one face restoration")

    def policies(self) -> dict[str, Policy]:
        """Each feature's policy: its own setting, else `policy` where the feature allows it, else its
        default."""
        chosen = {}
        for unit in REGISTRY:
            own = getattr(self, f"policy_{unit.name}")
            chosen[unit.name] = own or (self.policy if self.policy in unit.allowed else unit.default)
        return chosen

    @property
    def profile(self):
        return PROFILES[self.a1111_profile]

    @model_validator(mode="after")
    def _allowed_policies(self) -> "Settings":
        for unit in REGISTRY:
            own = getattr(self, f"policy_{unit.name}")
            if own and own not in unit.allowed:
                raise ValueError(f"UPSCALE_PROXY_POLICY_{unit.name.upper()}={own} is not one of "
                                 f"{', '.join(unit.allowed)} (the policies {type(unit).__name__} allows)")
        return self

    @model_validator(mode="after")
    def _webhooks_need_a_public_url(self) -> "Settings":
        if self.webhooks and not self.public_url:
            raise ValueError("UPSCALE_PROXY_WEBHOOKS needs UPSCALE_PROXY_PUBLIC_URL: the URL V3 calls back")
        return self

    @model_validator(mode="after")
    def _sunset_after_deprecation(self) -> "Settings":
        if self.sunset_date and self.sunset_date < self.deprecation_date:
            raise ValueError(
                f"UPSCALE_PROXY_SUNSET_DATE ({self.sunset_date.isoformat()}) is earlier than "
                f"UPSCALE_PROXY_DEPRECATION_DATE ({self.deprecation_date.isoformat()})"
            )
        return self

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not re.fullmatch(r"rediss?://\S+", value.get_secret_value()):
            raise ValueError("must be a redis:// or rediss:// URL")
        return value

    @model_validator(mode="after")
    def _redis_for_replicas(self) -> "Settings":
        if self.redis_url is not None and self.fingerprint_secret is None:
            raise ValueError("UPSCALE_PROXY_REDIS_URL needs UPSCALE_PROXY_FINGERPRINT_SECRET: every replica "
                             "must compute the same key fingerprints (a secret made in one data_dir is not shared)")
        return self

    @field_validator("public_url", "face_restorer_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        return None if value is None else str(HttpUrl(value)).rstrip("/")

    @field_validator("host")
    @classmethod
    def _listen_host(cls, value: str) -> str:
        return host_name(value)

    @field_validator("data_dir", mode="before")
    @classmethod
    def _data_dir(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty (unset it for ./data)")
        return value

    @field_validator("data_dir")
    @classmethod
    def _a_directory(cls, value: Path) -> Path:
        try:  # made at start-up if missing: it, or the nearest part of it there is, must be a directory
            existing = next((p for p in (value, *value.absolute().parents) if p.exists()), None)
            if existing is not None and not existing.is_dir():
                raise ValueError(f"{existing} is not a directory")
        except OSError as e:
            raise ValueError(f"can't be looked at: {e}") from None
        return value

    @field_validator("deprecation_link", "successor_url")
    @classmethod
    def _link(cls, value: str | None) -> str | None:
        # it goes into a Link header as <value>: a path on this proxy or an http(s) URL, no spaces
        if value is None:
            return None
        if not re.fullmatch(r"[\x21-\x7e]+", value) or "<" in value or ">" in value:
            raise ValueError("must be a path or an http(s) URL: printable ASCII, no spaces or angle brackets")
        if not value.startswith("/"):
            HttpUrl(value)
        return value

    @field_validator("fingerprint_secret")
    @classmethod
    def _secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        secret = value.get_secret_value()
        if not secret.strip():
            raise ValueError("is empty (unset it to have one made and kept in the data directory)")
        try:
            secret.encode()
        except UnicodeEncodeError:
            raise ValueError("has bytes that are not UTF-8") from None
        return value

    @field_validator("migration_file")
    @classmethod
    def _migration_file(cls, value: Path | None) -> Path | None:
        """Read once here, so that a bad file stops the start naming the setting and what is wrong."""
        if value is not None:
            Rules.load(value)
        return value

    @field_validator("admin_token")
    @classmethod
    def _admin_token(cls, value: SecretStr | None) -> SecretStr | None:
        """It travels in a header, a cookie and a URL: printable ASCII, and long enough not to guess."""
        if value is not None and not re.fullmatch(r"[\x21-\x7e]{16,512}", value.get_secret_value()):
            raise ValueError("must be 16 to 512 printable ASCII characters, no spaces (unset it to have one made)")
        return value

    @field_validator("upstream", "v2_upstream")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        url = HttpUrl(value)  # raises with a clear message for anything that is not http(s)
        if url.query or url.fragment:
            raise ValueError("the upstream is a base URL: no query or fragment")
        return str(url).rstrip("/")
