"""Worker configuration: environment variables (VOXQUEUE_*, DEEPGRAM_API_KEY) and CLI flags.

A bad value is a clear error at start-up, never a traceback halfway through a session.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.options import install_extra_options, parse_extra_options
from producer.secrets import check_url_password, redact, redact_url

DEEPGRAM_PRODUCTION_URL = "wss://api.deepgram.com"


class ConfigError(ValueError):
    """A configuration value a user gave is unusable; the message says which and why."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VOXQUEUE_", extra="ignore", validate_default=True)

    redis_url: str = "redis://127.0.0.1:6379/0"
    # Redis Cluster (README "Scaling past one Redis"): also chosen by a redis+cluster:// URL.
    redis_cluster: bool = False
    namespace: str = "vq"
    partitions: int = Field(1, ge=1, le=4096)

    deepgram_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("DEEPGRAM_API_KEY", "VOXQUEUE_DEEPGRAM_API_KEY")
    )
    deepgram_url: str = DEEPGRAM_PRODUCTION_URL

    concurrency: int = Field(500, ge=1, le=100_000, description="sessions one worker process holds at most")
    consumer_name: str | None = None

    # Leases: the sessions consumer group's pending list is the lease table.
    lease_seconds: float = Field(5.0, gt=0.2, le=3600)
    renew_seconds: float = Field(1.0, gt=0.05, le=600)
    claim_batch: int = Field(4, ge=1, le=1000, description="new sessions taken per read")
    # A claim read returns the moment a session arrives; the block only bounds how often an idle
    # worker asks again (200 ms: 0.83 % of a core idle, 1000 ms: 0.23 %, BENCHMARKS.md).
    claim_block_ms: int = Field(1000, ge=10, le=60_000)
    max_takeovers: int = Field(5, ge=1, le=1000)

    # Deepgram connection behaviour.
    keepalive_seconds: float = Field(4.0, gt=0.1, le=9.0)
    stall_seconds: float = Field(10.0, gt=0.2, le=600, description="audio flows, no reply for this long")
    connect_timeout: float = Field(10.0, gt=0.1, le=120)
    close_timeout: float = Field(
        15.0, gt=0.1, le=600, description="wait for Deepgram to close after CloseStream"
    )
    backoff_initial: float = Field(0.2, gt=0, le=60)
    backoff_max: float = Field(10.0, gt=0, le=600)
    max_retries: int = Field(8, ge=0, le=1000, description="consecutive failed connects before giving up")
    catchup_speed: float = Field(
        1.25, ge=0, le=1000, description="max multiple of real time when replaying a backlog; 0 = unpaced"
    )
    catchup_burst_seconds: float = Field(2.0, ge=0, le=600)
    send_interval_ms: int = Field(
        0, ge=0, le=250, description="coalesce frames for up to this long per message; 0 = send what waits"
    )
    flux_send_interval_ms: int = Field(
        80,
        ge=0,
        le=250,
        description="Flux sessions: coalesce live frames for this long (Deepgram recommends 80 ms messages)",
    )
    max_frames_per_message: int = Field(12, ge=1, le=250)

    # Sessions.
    idle_timeout: float = Field(60.0, gt=0.1, le=86_400, description="no frame and no end: abandoned")
    retention_seconds: int = Field(86_400, ge=1, description="TTL of an ended session's keys")
    max_session_seconds: float = Field(4 * 3600, gt=0, description="longer sessions are cut off")
    drain_seconds: float = Field(20.0, ge=0, le=3600)
    results_maxlen: int = Field(1_000_000, ge=1000, description="approximate cap of partition results")

    read_count: int = Field(64, ge=1, le=10_000, description="XREAD COUNT per stream")
    read_interval_ms: float = Field(
        10.0, ge=0, le=100, description="at most one audio read per interval, so each read carries more"
    )
    extra_options: str = Field(
        "",
        description="Deepgram options added to the allow-list, name:kind,... (kinds: bool, str, int, "
        "str_list, bool_or_int); callback, callback_method and the format options are always refused",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    metrics_port: int | None = Field(None, ge=0, le=65535)

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """repr() and str() show the Redis URL without its password (a Settings printed while
        debugging, or caught in an error report, must not carry it)."""
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name == "redis_url" and isinstance(value, str) else value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(
            ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")
        ):
            raise ValueError(
                "must start with redis://, rediss://, unix://, redis+cluster:// or rediss+cluster://"
            )
        # A password redis-py would misread (an unescaped / ? #) sends it to a host made of part
        # of the password, which its errors then print: refuse it here, without quoting it.
        check_url_password(value)
        return value

    @field_validator("deepgram_url")
    @classmethod
    def _ws_scheme(cls, value: str) -> str:
        if not value.startswith(("ws://", "wss://")):
            raise ValueError("must start with ws:// or wss://")
        return value.rstrip("/")

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if not value or any(c in value for c in "{}: \t\r\n"):
            raise ValueError("must be non-empty, without braces, colons or whitespace")
        return value

    @field_validator("extra_options")
    @classmethod
    def _extra_options(cls, value: str) -> str:
        parse_extra_options(value)  # ValueError names the bad entry
        return value

    @property
    def extra_options_map(self) -> dict[str, str]:
        return parse_extra_options(self.extra_options)

    @model_validator(mode="after")
    def _renew_inside_lease(self) -> Settings:
        if self.renew_seconds * 2 > self.lease_seconds:
            raise ValueError(
                f"renew_seconds ({self.renew_seconds}) must be at most half of lease_seconds "
                f"({self.lease_seconds}) so a live owner never loses its lease"
            )
        if self.backoff_max < self.backoff_initial:
            raise ValueError("backoff_max must be >= backoff_initial")
        return self

    @property
    def cluster(self) -> bool:
        """Redis Cluster mode: a redis+cluster:// URL or VOXQUEUE_REDIS_CLUSTER=1."""
        return self.redis_cluster or self.redis_url.startswith(("redis+cluster://", "rediss+cluster://"))

    @property
    def uses_real_deepgram(self) -> bool:
        return self.deepgram_url == DEEPGRAM_PRODUCTION_URL

    def api_key(self) -> str:
        return self.deepgram_api_key.get_secret_value() if self.deepgram_api_key else ""


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment plus explicit overrides (CLI flags, None = not given)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        settings = Settings(**given)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"])
            # Never echo the rejected input: it may be a secret.
            if not name:  # a rule across several settings: its message names them
                problems.append(err["msg"].removeprefix("Value error, "))
                continue
            env = f"VOXQUEUE_{name.upper()}" if name != "deepgram_api_key" else "DEEPGRAM_API_KEY"
            problems.append(f"{name} ({env}): {err['msg']}")
        # redact(): no message here quotes an input, but a URL in one must still come out masked.
        raise ConfigError(redact("invalid configuration: " + "; ".join(problems))) from None
    if settings.uses_real_deepgram and not settings.api_key():
        raise ConfigError(
            "DEEPGRAM_API_KEY is not set: set it to use Deepgram, or point VOXQUEUE_DEEPGRAM_URL "
            "at an emulator (voxqueue emulator)"
        )
    # The allow-list extension applies process-wide: every place that checks a session's options
    # (intake, the session runner, admin replay) then accepts the same names.
    install_extra_options(settings.extra_options_map)
    return settings
