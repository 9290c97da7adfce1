"""One Settings object for the whole server.

`ENVIRONMENT` (dev|test|prod) picks `env/.env.<ENVIRONMENT>`; real environment variables win over the file.
A bad value stops start-up with one line naming the key and what is allowed (see `load_settings`).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from application.key_list import ApiKeyEntry, parse_api_keys
from application.services.scheduler import RETRY_BACKOFF_CAP, LinkScore, Policy
from application.setting_values import (
    MAX_REDIS_DB,
    check_networks,
    check_redis_host,
    check_redis_url,
    check_webhook_urls,
    describe_error,
    is_loopback,
    parse_rate,
    parse_roots,
    parse_simulated_gpus,
    split_list,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Uploads (POST /files) live in <each DATA_ROOTS folder>/uploads/<owner folder>/.
UPLOADS_DIR = "uploads"
ENV_DIR = PROJECT_ROOT / "env"


class GpuBackend(str, Enum):
    AUTO = "auto"
    NVML = "nvml"
    SIMULATED = "simulated"


class QueuePolicy(str, Enum):
    STRICT = "strict"
    BACKFILL = "backfill"


def env_file() -> Path | None:
    """env/.env.<ENVIRONMENT>, when there is one: real environment variables win over it."""
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
    _api_keys: tuple[ApiKeyEntry, ...] = PrivateAttr(default=())

    # Redis. REDIS_URL wins over host/port/db; with neither set (and REDIS_EMBEDDED not false) an
    # embedded redis-server is started under DATA_DIR.
    REDIS_URL: str | None = None
    REDIS_HOST: str | None = None
    REDIS_PORT: int = Field(6379, ge=1, le=65535)
    REDIS_DB: int = Field(0, ge=0, le=MAX_REDIS_DB)
    REDIS_PASSWORD: str | None = None
    REDIS_KEY_PREFIX: str = "swift-api"
    REDIS_SOCKET_TIMEOUT: float = Field(5.0, gt=0, le=300)
    REDIS_CONNECT_TIMEOUT: float = Field(3.0, gt=0, le=300)
    REDIS_RETRIES: int = Field(3, ge=0, le=20)
    REDIS_EMBEDDED: bool = True
    REDIS_SERVER_BIN: str | None = None
    DATA_DIR: Path = PROJECT_ROOT / "data"

    LOG_LEVEL: Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    LOG_DIR: Path = PROJECT_ROOT / "logs"
    # The mode bits nothing the server writes has (umask's octal): 077 keeps uploads, checkpoints, logs and Redis's
    # files its user's alone (at the operator's 022, every account on the host read every team's: hunt DR).
    UMASK: str = "077"

    API_PREFIX: str = "/api/v1"
    # HTTP worker processes of the API role (stateless: every request goes to the store).
    API_WORKERS: int = Field(default_factory=lambda: min(4, os.cpu_count() or 1), ge=1, le=64)
    # Set by start.py for the processes it starts: they end when it dies, so none serves on alone.
    DIE_WITH_PARENT: bool = False
    # Niceness of the API workers (0-19): under a request storm the scheduler and the runners, at the default
    # priority, still get the CPU first, so HTTP load never delays a start or a recorded end.
    API_NICE: int = Field(10, ge=0, le=19)
    # Default: 127.0.0.1 without API keys (nobody else can reach an open server), 0.0.0.0 with them.
    APP_HOST: str | None = None
    APP_PORT: int = Field(8000, ge=1, le=65535)
    MAX_REQUEST_BYTES: int = Field(1 << 20, ge=1024, le=1 << 30)
    # A request's line and headers must arrive within this (408); a client that takes under 500 B/s of a response for
    # CLIENT_STALL_SECONDS is dropped (below every slot's life: a stalled stream must not outlive its slot).
    CLIENT_HEAD_SECONDS: float = Field(20.0, gt=0, le=600)
    CLIENT_STALL_SECONDS: float = Field(30.0, gt=0, le=50)
    # Behind a reverse proxy at a sub-path (https://host/swift/ passed on as /...): the path the clients see in
    # front of every route, for the links, redirects, Swagger UI and the login cookie's path.
    ROOT_PATH: str = ""
    # The proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (addresses or networks, comma-separated;
    # "*" for any): the client's address and whether it came over https (the login cookie's Secure flag).
    FORWARDED_ALLOW_IPS: str = "127.0.0.1,::1"

    # Access. API_KEYS: comma-separated `name:role:key` (role admin|user); or API_KEYS_FILE, a JSON file
    # {"<name>": {"role": "...", "key": "..."}}. Without keys the server answers anyone who can reach it, so it
    # binds only to loopback unless ALLOW_UNAUTHENTICATED=true.
    API_KEYS: SecretStr | None = None
    API_KEYS_FILE: Path | None = None
    ALLOW_UNAUTHENTICATED: bool = False

    # Local paths in requests must resolve inside these folders (comma-separated; relative to the project).
    DATA_ROOTS: str = "datasets"
    MODEL_ROOTS: str = "models"
    # POST /files stores uploads under the first data root, in uploads/<owner>/; larger files are refused (413).
    FILE_MAX_BYTES: int = Field(1 << 30, ge=1, le=1 << 40, description="the largest data set POST /files accepts")
    FILE_QUOTA_BYTES: int = Field(0, ge=0, le=1 << 50, description="bytes of uploads one owner may keep (0: no limit)")
    # Uploads one key may have in progress at once, over all API workers (429 beyond; 0: no limit): the quota can
    # only count a file once it is whole, so this bounds what one key's uploads hold on disk meanwhile.
    UPLOADS_PER_OWNER: int = Field(4, ge=0, le=10_000)
    # An upload whose client sends nothing for this long is ended (408, its partial file removed): stalled, it
    # would keep its socket and partial file, and its slot (which lapses) would let the key open more.
    UPLOAD_IDLE_SECONDS: float = Field(30.0, ge=1, le=3600)
    # Artifact downloads one key may have in progress at once, over all API workers (429 beyond; 0: no limit).
    DOWNLOADS_PER_OWNER: int = Field(8, ge=0, le=10_000)

    # Per-owner limits (0 = none) and the create rate per key ("30/minute", "0" = none).
    MAX_QUEUED_PER_OWNER: int = Field(0, ge=0, le=1_000_000)
    MAX_GPUS_PER_OWNER: int = Field(0, ge=0, le=4096)
    # Runs an owner's jobs hold at once, on GPUs or the CPU (CPU-only jobs hold no GPU: without this, one key
    # could run any number of them on the scheduler's host).
    MAX_RUNNING_PER_OWNER: int = Field(0, ge=0, le=100_000)
    CREATE_RATE_LIMIT: str = "60/minute"
    JOB_RETENTION_DAYS: float = Field(90.0, ge=0, le=36500)

    OUTPUT_ROOT: Path = PROJECT_ROOT / "output"
    SWIFT_BIN: str = Field(default_factory=_default_swift_bin)
    SWIFT_VERSION: str | None = None
    STOP_GRACE_SECONDS: float = Field(10.0, ge=0, le=86400)
    # Where runners cannot outlive the scheduler (in a container, they die with its main process), a stopping
    # scheduler ends this host's runs itself: each goes back to the queue, to resume from its last checkpoint.
    STOP_RUNS_ON_SHUTDOWN: bool = False
    # How many times a job's runs (or an export) go back to the queue because their host went down under them;
    # once more and it fails: a run that brings its host down itself (host memory, a driver fault) would loop.
    HOST_RESTART_REQUEUES: int = Field(3, ge=0, le=1000)
    AUTO_EXPORT: bool = True
    # A runner reads its run's log, checks for stop requests and beats its heartbeat this often.
    RUNNER_POLL_INTERVAL: float = Field(0.5, gt=0, le=60)
    # A runner on another host is lost once the scheduler has seen no heartbeat for 3 of these; on its own host
    # the scheduler sees its death at once from the pid and its stamp, and kills one silent for 3 of these as hung.
    RUNNER_HEARTBEAT_TTL: float = Field(10.0, ge=1, le=3600)
    # The scheduler leader's lock: a standby takes over this long after the leader stops renewing it.
    LEADER_TTL_SECONDS: float = Field(3.0, ge=0.5, le=300)
    LOSS_HISTORY_LIMIT: int = Field(2000, ge=10, le=1_000_000)
    EVENTS_MAX_PER_JOB: int = Field(1000, ge=10, le=1_000_000)
    LOG_TAIL_ON_FAILURE: int = Field(50, ge=1, le=1000)

    GPU_BACKEND: GpuBackend = GpuBackend.AUTO
    # The GPUs NVML's scheduler may use (it gave runs every GPU, those the operator held back included: hunt DO);
    # read as CUDA reads it, by the scheduler only (gpu_utils.create_inventory), never refused.
    CUDA_VISIBLE_DEVICES: str | None = None
    SIMULATED_GPUS: str = "0"
    # JSON file whose per-GPU usage the simulated backend re-reads, so tests can make GPUs look busy.
    SIMULATED_GPU_USAGE_FILE: Path | None = None
    GPU_MIN_FREE_MEMORY_GB: float = Field(2.0, ge=0, le=4096)
    GPU_MAX_UTILIZATION: float = Field(90.0, ge=0, le=100)

    QUEUE_PROCESSOR_AUTOSTART: bool = True
    QUEUE_POLL_INTERVAL: float = Field(5.0, gt=0, le=3600)
    QUEUE_POLICY: QueuePolicy = QueuePolicy.BACKFILL
    # Backfill: a blocked job's reservation binds jobs of its own priority only once it has waited this long
    # (before, they may take its GPUs whatever their duration: first fit); 0 = at once (pure EASY backfill).
    QUEUE_STARVATION_SECONDS: float = Field(1800.0, ge=0, le=30 * 86400)
    # Preemption (off by default): a queued job that cannot start pauses running jobs of lower priority that hold
    # enough GPUs for it; they go back to the queue and resume from their checkpoints.
    PREEMPTION: bool = False
    # Webhooks: a POST to each of these (comma-separated http(s) URLs) and to a job's own webhook_url when a job
    # ends, is paused or preempted, or finishes an export; signed with WEBHOOK_SECRET (HMAC-SHA256 of the body).
    WEBHOOK_URLS: str = ""
    WEBHOOK_SECRET: SecretStr | None = None
    WEBHOOK_MAX_ATTEMPTS: int = Field(5, ge=1, le=20)
    WEBHOOK_RETRY_SECONDS: float = Field(2.0, gt=0, le=3600)
    WEBHOOK_TIMEOUT_SECONDS: float = Field(10.0, gt=0, le=120)
    # A job's own webhook_url may not point at loopback, private or link-local addresses unless this is true
    # (whoever creates a job would otherwise make the server call into its own network).
    WEBHOOK_ALLOW_PRIVATE: bool = False
    # Server-Sent Events: how often a stream looks for news, and the comment heartbeat of an idle one.
    STREAM_POLL_SECONDS: float = Field(0.5, gt=0, le=10)
    STREAM_HEARTBEAT_SECONDS: float = Field(15.0, gt=0, le=300)
    # Streams one key may hold open at once, over all API workers (429 beyond; 0: no limit). Keyless callers share one.
    STREAMS_PER_OWNER: int = Field(64, ge=0, le=100_000)
    # A run is never preempted before it has run this long since its last start (no thrashing).
    PREEMPTION_MIN_RUN_SECONDS: float = Field(600.0, ge=0, le=30 * 86400)
    # A retried run waits this long in the queue before it may start, doubled at each retry of the job and at most
    # RETRY_BACKOFF_CAP: a fault of a minute (a node's, a file system's) used up every retry in seconds.
    RETRY_BACKOFF_SECONDS: float = Field(30.0, ge=0, le=RETRY_BACKOFF_CAP)

    @field_validator("API_PREFIX", "ROOT_PATH")
    @classmethod
    def _prefix(cls, v: str) -> str:
        v = v.rstrip("/")
        if v and not v.startswith("/"):
            raise ValueError("must start with '/' (for example /api/v1) or be empty")
        # ({...} would make it a path parameter: any value there matched every route)
        if v and not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", v):
            raise ValueError("must be path segments of letters, digits, '.', '_', '~' or '-' (for example /api/v1)")
        # (clients collapse /api/../training to /training before sending it: nothing could reach the API)
        if any(part in (".", "..") for part in v.split("/")):
            raise ValueError("must not have a '.' or '..' segment: clients remove them (for example /api/v1)")
        return v

    @field_validator("FORWARDED_ALLOW_IPS")
    @classmethod
    def _forwarded_allow_ips(cls, v: str) -> str:
        return check_networks(v)

    @field_validator("UMASK")
    @classmethod
    def _umask(cls, v: str) -> str:
        if not re.fullmatch(r"0?0[0-7]{2}", v.strip()):  # (the owner's bits kept: the server reads what it writes)
            raise ValueError("must be 3 octal digits starting with 0, as umask takes them: 077 (the server's user "
                             "alone reads what it writes) or 027 (its group too)")  # fmt: skip
        return v.strip()[-3:]

    @field_validator("REDIS_KEY_PREFIX")
    @classmethod
    def _key_prefix(cls, v: str) -> str:
        # No ':': keys join their parts with it, so prefixes 'P' and 'P:job' shared keys (job 'queue' of the one
        # was the other's queue).
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", v):
            raise ValueError("must be 1-64 characters of letters, digits, '_', '.' or '-' (no ':')")
        return v

    @field_validator("GPU_BACKEND", "QUEUE_POLICY", mode="before")
    @classmethod
    def _any_case(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v  # (GPU_BACKEND=NVML was refused for its case)

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
        "APP_HOST",
        "API_KEYS",
        "API_KEYS_FILE",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        return None if v == "" else v

    @field_validator("DATA_DIR", "LOG_DIR", "OUTPUT_ROOT", mode="before")
    @classmethod
    def _folder_named(cls, v: Any) -> Any:
        # (an empty value was the project's own folder: Redis's data or the logs landed among its sources)
        if isinstance(v, str) and not v.strip():
            raise ValueError("is empty: name a folder, or leave the setting out for its default")
        return v

    @field_validator("LOG_LEVEL", mode="before")
    @classmethod
    def _level(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v  # (LOG_LEVEL=debug was refused)

    @field_validator("APP_HOST")
    @classmethod
    def _app_host(cls, v: str | None) -> str | None:
        # [::1] as in a URL: bound as ::1 (it was refused as a network address, and no socket takes the brackets)
        return v[1:-1] if v is not None and v.startswith("[") and v.endswith("]") else v

    @field_validator("REDIS_HOST")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        return None if v is None else check_redis_host(v)

    @field_validator("REDIS_URL")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return None if v is None else check_redis_url(v)

    @field_validator("CREATE_RATE_LIMIT")
    @classmethod
    def _rate(cls, v: str) -> str:
        parse_rate(v)
        return v

    @field_validator("WEBHOOK_URLS")
    @classmethod
    def _webhook_urls(cls, v: str) -> str:
        return check_webhook_urls(v)

    @field_validator("DATA_ROOTS", "MODEL_ROOTS")
    @classmethod
    def _roots(cls, v: str) -> str:
        if not [p for p in v.split(",") if p.strip()]:
            raise ValueError("must name at least one folder (comma-separated)")
        # A root may not exist yet (uploads make the first data root); one that is a file is a mistake, and
        # uploads into it answered 507 as if the disk were full.
        for root in parse_roots(v, PROJECT_ROOT):
            try:
                is_file = root.is_file()
            except OSError:
                continue  # (one that cannot be looked at now is the requests' to refuse, as before)
            if is_file:
                raise ValueError(f"{root} is a file, not a folder")
        return v

    @model_validator(mode="after")
    def _resolve_paths(self) -> Settings:
        # A command (a bare name: looked up on PATH) or a path, relative to the project, as every path setting is.
        for name in ("SWIFT_BIN", "REDIS_SERVER_BIN"):
            command: str | None = getattr(self, name)
            if command is None:
                continue
            if command.startswith("~"):
                command = os.path.expanduser(command)
            if "/" in command and not Path(command).is_absolute():
                command = str((PROJECT_ROOT / command).resolve())
            object.__setattr__(self, name, command)
        for name in ("DATA_DIR", "LOG_DIR", "OUTPUT_ROOT", "SIMULATED_GPU_USAGE_FILE", "API_KEYS_FILE"):
            p: Path | None = getattr(self, name)
            if p is not None:
                # ~ as DATA_ROOTS and MODEL_ROOTS take it (it made a folder named ~ inside the project)
                p = p.expanduser()
                object.__setattr__(self, name, p if p.is_absolute() else (PROJECT_ROOT / p).resolve())
        return self

    @model_validator(mode="after")
    def _output_root_apart(self) -> Settings:
        # Any folder under OUTPUT_ROOT may be named as a job's output_dir and its files downloaded as the job's
        # artifacts: it must not hold the server's own files (keys in env/, Redis's data, logs) or the data sets.
        root = Path(os.path.realpath(self.OUTPUT_ROOT))
        own: dict[str, Path | None] = {"the server's own folder": PROJECT_ROOT, "DATA_DIR": self.DATA_DIR,
                                       "LOG_DIR": self.LOG_DIR, "API_KEYS_FILE": self.API_KEYS_FILE}  # fmt: skip
        own |= {f"DATA_ROOTS folder {p}": p for p in self.data_roots()}
        own |= {f"MODEL_ROOTS folder {p}": p for p in parse_roots(self.MODEL_ROOTS, PROJECT_ROOT)}
        for name, path in own.items():
            real = Path(os.path.realpath(path)) if path is not None else None
            if real is not None and (real == root or root in real.parents):
                raise ValueError(f"OUTPUT_ROOT={self.OUTPUT_ROOT} holds {name}: every folder under OUTPUT_ROOT can be "
                                 "a job's output and be downloaded, so give it a folder of its own (such as "
                                 "./output)")  # fmt: skip
        for name in ("DATA_DIR", "LOG_DIR"):
            server_folder = Path(os.path.realpath(getattr(self, name)))
            for setting, roots in (("DATA_ROOTS", self.data_roots()), ("MODEL_ROOTS", self.model_roots())):
                if any(Path(os.path.realpath(r)) == server_folder for r in roots):
                    # (its every file the server's: each request naming one was refused, one by one)
                    raise ValueError(f"{setting} names {name} ({server_folder}), the server's own folder: give the "
                                     "data sets or models a folder of their own (one inside it is fine)")  # fmt: skip
        for data_root in self.data_roots():
            uploads = Path(os.path.realpath(data_root / UPLOADS_DIR))
            if root == uploads or uploads in root.parents:
                # (a job named after an owner's folder there listed and downloaded their uploads as its artifacts)
                raise ValueError(f"OUTPUT_ROOT={self.OUTPUT_ROOT} lies in {uploads}, where uploaded files are kept: "
                                 "give it a folder of its own (such as ./output)")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _access(self) -> Settings:
        # Parsed here so a bad key list stops start-up with one line, like any other bad setting.
        keys = parse_api_keys(self.API_KEYS.get_secret_value() if self.API_KEYS else None, self.API_KEYS_FILE)
        self._api_keys = keys
        return self

    def open_to_the_network(self) -> str | None:
        """Why the API must not listen as configured (on a network address with no keys), or None. Checked by the
        roles that listen (start.py): a runner or a scheduler listens on nothing, and a runner, which gets no keys,
        failed every run when the env file named a network APP_HOST (env/.env.prod)."""
        if self.APP_HOST is None or self._api_keys or self.ALLOW_UNAUTHENTICATED or is_loopback(self.APP_HOST):
            return None
        return (f"APP_HOST={self.APP_HOST} would let anyone on the network run and delete jobs: configure API_KEYS "
                "or API_KEYS_FILE, bind 127.0.0.1, or set ALLOW_UNAUTHENTICATED=true")  # fmt: skip

    @property
    def api_keys(self) -> tuple[ApiKeyEntry, ...]:
        return self._api_keys

    @property
    def bind_host(self) -> str:
        if self.APP_HOST is not None:
            return self.APP_HOST
        return "0.0.0.0" if self.api_keys else "127.0.0.1"

    def webhook_urls(self) -> tuple[str, ...]:
        return tuple(split_list(self.WEBHOOK_URLS))

    def data_roots(self) -> tuple[Path, ...]:
        return parse_roots(self.DATA_ROOTS, PROJECT_ROOT)

    def model_roots(self) -> tuple[Path, ...]:
        # A merged model written under OUTPUT_ROOT can be trained again.
        return (*parse_roots(self.MODEL_ROOTS, PROJECT_ROOT), self.OUTPUT_ROOT)

    def missing_roots(self) -> list[tuple[str, Path]]:
        """The DATA_ROOTS and MODEL_ROOTS that are no folder here (a typo, a mount not there yet): warned of."""
        named = (("DATA_ROOTS", self.data_roots()), ("MODEL_ROOTS", parse_roots(self.MODEL_ROOTS, PROJECT_ROOT)))
        return [(name, root) for name, roots in named for root in roots if not root.is_dir()]

    def scheduling_policy(self, link_score: LinkScore | None = None) -> Policy:
        """The pure scheduler's Policy for these settings."""
        return Policy(name=self.QUEUE_POLICY.value, min_free_gb=self.GPU_MIN_FREE_MEMORY_GB,
                      max_util=self.GPU_MAX_UTILIZATION, owner_gpu_cap=self.MAX_GPUS_PER_OWNER,
                      owner_run_cap=self.MAX_RUNNING_PER_OWNER, starvation_seconds=self.QUEUE_STARVATION_SECONDS,
                      link_score=link_score)  # fmt: skip

    def create_rate(self) -> tuple[int, float] | None:
        return parse_rate(self.CREATE_RATE_LIMIT)

    def runner_env(self, base: Mapping[str, str]) -> dict[str, str]:
        """The environment a runner starts with: `base` (the scheduler's own) and these settings, without what
        only an HTTP server needs (its address, its keys), whether it came as a setting or a variable."""
        return {k: v for k, v in base.items() if k not in _NOT_FOR_CHILDREN} | self.as_env()

    def as_env(self) -> dict[str, str]:
        """These settings as environment variables, for a process started with them (a runner). What only an
        HTTP server needs (its address, its keys) is left out."""
        out: dict[str, str] = {}
        for name, value in self.model_dump(mode="json").items():
            if name in _NOT_FOR_CHILDREN or value is None:
                continue
            if isinstance(value, bool):
                value = "true" if value else "false"
            out[name] = str(value)
        if self.REDIS_PASSWORD:
            out["REDIS_PASSWORD"] = self.REDIS_PASSWORD
        return out

    @property
    def umask(self) -> int:
        """UMASK as `os.umask` takes it."""
        return int(self.UMASK, 8)

    @property
    def uses_embedded_redis(self) -> bool:
        return self.REDIS_URL is None and self.REDIS_HOST is None and self.REDIS_EMBEDDED


# The swift-api CLI's own variables (an operator's shell that started the server may hold its key).
CLIENT_VARIABLES = ("SWIFT_API_KEY", "SWIFT_API_URL")
# What a helper process that needs none of them (redis-server, multiprocessing's resource tracker) starts without.
SECRET_VARIABLES = frozenset({"API_KEYS", "REDIS_PASSWORD", "REDIS_URL", "WEBHOOK_SECRET", "WEBHOOK_URLS",
                              *CLIENT_VARIABLES})  # fmt: skip
_NOT_FOR_CHILDREN = frozenset(CLIENT_VARIABLES) | frozenset(
    {"APP_HOST", "API_KEYS", "API_KEYS_FILE", "ALLOW_UNAUTHENTICATED", "DIE_WITH_PARENT", "WEBHOOK_SECRET",
     "WEBHOOK_URLS",  # (the scheduler posts; a runner only queues, by a flag in Redis)
     "ROOT_PATH", "FORWARDED_ALLOW_IPS"}
)  # fmt: skip


def load_settings(**overrides: Any) -> Settings:
    """Build Settings, or exit with one readable line per bad key."""
    try:
        return Settings(_env_file=env_file(), **overrides)
    except ValidationError as exc:
        lines = [describe_error(dict(e), SECRET_VARIABLES) for e in exc.errors()]
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
