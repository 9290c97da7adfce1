"""One Settings object for the whole server.

`ENVIRONMENT` (dev|test|prod) picks `env/.env.<ENVIRONMENT>`; real environment variables win over the file.
A bad value stops start-up with one line naming the key and what is allowed (see `load_settings`).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENV_DIR = PROJECT_ROOT / "env"


class GpuBackend(str, Enum):
    AUTO = "auto"
    NVML = "nvml"
    SIMULATED = "simulated"


class QueuePolicy(str, Enum):
    STRICT = "strict"
    BACKFILL = "backfill"


def _env_file() -> Path | None:
    environment = os.environ.get("ENVIRONMENT", "dev")
    path = ENV_DIR / f".env.{environment}"
    return path if path.is_file() else None


def _default_swift_bin() -> str:
    local = PROJECT_ROOT / ".swift-venv" / "bin" / "swift"
    if local.exists():
        return str(local)
    return "swift"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", case_sensitive=True, env_file_encoding="utf-8")

    ENVIRONMENT: Literal["dev", "test", "prod"] = "dev"

    # Redis. REDIS_URL wins over host/port/db; with neither set (and REDIS_EMBEDDED not false) an
    # embedded redis-server is started under DATA_DIR.
    REDIS_URL: str | None = None
    REDIS_HOST: str | None = None
    REDIS_PORT: int = Field(6379, ge=1, le=65535)
    REDIS_DB: int = Field(0, ge=0, le=15)
    REDIS_PASSWORD: str | None = None
    REDIS_KEY_PREFIX: str = "swift-api"
    REDIS_SOCKET_TIMEOUT: float = Field(5.0, gt=0)
    REDIS_CONNECT_TIMEOUT: float = Field(3.0, gt=0)
    REDIS_RETRIES: int = Field(3, ge=0, le=20)
    REDIS_EMBEDDED: bool = True
    REDIS_SERVER_BIN: str | None = None
    DATA_DIR: Path = PROJECT_ROOT / "data"

    LOG_LEVEL: Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    LOG_DIR: Path = PROJECT_ROOT / "logs"

    API_PREFIX: str = "/api/v1"
    APP_HOST: str = "0.0.0.0"
    APP_PORT: int = Field(8000, ge=1, le=65535)

    OUTPUT_ROOT: Path = PROJECT_ROOT / "output"
    SWIFT_BIN: str = Field(default_factory=_default_swift_bin)
    SWIFT_VERSION: str | None = None
    STOP_GRACE_SECONDS: float = Field(10.0, ge=0)
    AUTO_EXPORT: bool = True
    SUPERVISOR_POLL_INTERVAL: float = Field(0.5, gt=0, le=60)
    LOSS_HISTORY_LIMIT: int = Field(2000, ge=10, le=1_000_000)
    EVENTS_MAX_PER_JOB: int = Field(1000, ge=10, le=1_000_000)
    LOG_TAIL_ON_FAILURE: int = Field(50, ge=1, le=1000)

    GPU_BACKEND: GpuBackend = GpuBackend.AUTO
    SIMULATED_GPUS: str = "0"
    # JSON file whose per-GPU usage the simulated backend re-reads, so tests can make GPUs look busy.
    SIMULATED_GPU_USAGE_FILE: Path | None = None
    GPU_MIN_FREE_MEMORY_GB: float = Field(2.0, ge=0)
    GPU_MAX_UTILIZATION: float = Field(90.0, ge=0, le=100)

    QUEUE_PROCESSOR_AUTOSTART: bool = True
    QUEUE_POLL_INTERVAL: float = Field(5.0, gt=0, le=3600)
    QUEUE_POLICY: QueuePolicy = QueuePolicy.BACKFILL

    @field_validator("API_PREFIX")
    @classmethod
    def _prefix(cls, v: str) -> str:
        v = v.rstrip("/")
        if v and not v.startswith("/"):
            raise ValueError("must start with '/' (for example /api/v1) or be empty")
        return v

    @field_validator("REDIS_KEY_PREFIX")
    @classmethod
    def _key_prefix(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", v):
            raise ValueError("must be 1-64 characters of letters, digits, '_', '.', ':' or '-'")
        return v

    @field_validator("SIMULATED_GPUS")
    @classmethod
    def _simulated(cls, v: str) -> str:
        parse_simulated_gpus(v)
        return v

    @field_validator("SWIFT_VERSION")
    @classmethod
    def _swift_version(cls, v: str | None) -> str | None:
        if v in (None, ""):
            return None
        if not re.fullmatch(r"\d+(\.\d+){0,2}", v):
            raise ValueError("must be a version such as 4.6.0 or 3.5.3")
        return v

    @field_validator(
        "REDIS_URL",
        "REDIS_HOST",
        "REDIS_PASSWORD",
        "REDIS_SERVER_BIN",
        "SIMULATED_GPU_USAGE_FILE",
        "SWIFT_VERSION",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        return None if v == "" else v

    @field_validator("REDIS_URL")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^(redis|rediss|unix)://", v):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v

    @model_validator(mode="after")
    def _resolve_paths(self) -> Settings:
        if "/" in self.SWIFT_BIN and not Path(self.SWIFT_BIN).is_absolute():
            object.__setattr__(self, "SWIFT_BIN", str((PROJECT_ROOT / self.SWIFT_BIN).resolve()))
        for name in ("DATA_DIR", "LOG_DIR", "OUTPUT_ROOT", "SIMULATED_GPU_USAGE_FILE"):
            p: Path | None = getattr(self, name)
            if p is not None and not p.is_absolute():
                object.__setattr__(self, name, (PROJECT_ROOT / p).resolve())
        return self

    @property
    def uses_embedded_redis(self) -> bool:
        return self.REDIS_URL is None and self.REDIS_HOST is None and self.REDIS_EMBEDDED

    def simulated_gpus(self) -> tuple[int, float]:
        return parse_simulated_gpus(self.SIMULATED_GPUS)

    def swift_bin_path(self) -> str | None:
        return shutil.which(self.SWIFT_BIN)


_SIM_RE = re.compile(r"^\s*(\d{1,3})\s*(?:[xX]\s*(\d+(?:\.\d+)?))?\s*$")


def parse_simulated_gpus(value: str) -> tuple[int, float]:
    """`4` -> 4 GPUs of 80 GiB; `4x24` -> 4 GPUs of 24 GiB."""
    m = _SIM_RE.match(value)
    if not m:
        raise ValueError("must be a GPU count, optionally with GiB per GPU, such as 4 or 4x80")
    count = int(m.group(1))
    memory = float(m.group(2)) if m.group(2) else 80.0
    if count > 64 or memory <= 0:
        raise ValueError("must be 0-64 GPUs with a positive GiB size, such as 4 or 4x80")
    return count, memory


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in error.get("loc", ())) or "settings"
    ctx = error.get("ctx") or {}
    if error.get("type") == "literal_error" and "expected" in ctx:
        allowed = ctx["expected"]
    elif error.get("type") == "enum" and "expected" in ctx:
        allowed = ctx["expected"]
    else:
        allowed = None
    msg = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    got = error.get("input")
    text = f"invalid setting {key}={got!r}: {msg}"
    if allowed and str(allowed) not in msg:
        text += f" (allowed: {allowed})"
    return text


def load_settings(**overrides: Any) -> Settings:
    """Build Settings, or exit with one readable line per bad key."""
    try:
        return Settings(_env_file=_env_file(), **overrides)
    except ValidationError as exc:
        lines = [_describe(dict(e)) for e in exc.errors()]
        raise SettingsError("; ".join(lines)) from None


class SettingsError(Exception):
    pass


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        print(f"swift-api: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
