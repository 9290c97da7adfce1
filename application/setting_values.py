"""The values a setting takes, parsed and checked: lists, folders, rates, simulated GPUs, Redis hosts and URLs.

Each check raises ValueError with the words `Settings` shows next to the key's name.
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from redis.connection import parse_url

MAX_REDIS_DB = 15


def check_redis_host(v: str) -> str:
    # Anything with ':' is taken for an IPv6 address: "host:6380" or "redis://host" got a traceback, and a
    # scheduler started again and again, rather than this line.
    try:
        if ":" in v:
            ipaddress.IPv6Address(v.removeprefix("[").removesuffix("]"))
            return v
    except ValueError:
        pass
    else:
        if re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,252})", v):
            return v
    raise ValueError("must be a host name or an IP address, without scheme or port (REDIS_PORT takes the port, "
                     "REDIS_URL a whole URL)")  # fmt: skip


def check_redis_url(v: str) -> str:
    if not re.match(r"^(redis|rediss|unix)://", v):
        raise ValueError("must start with redis://, rediss:// or unix://")
    try:  # what the client reads of it, now: a typo in the port or db is one line here, not a crash loop
        db = parse_url(v).get("db")
        parts = urlsplit(v)
        parts.port  # noqa: B018 (it raises for a port out of range)
        if parts.scheme != "unix" and not re.fullmatch(r"/?\d*", parts.path):
            raise ValueError  # the client reads a db that is not a number as db 0, silently
    except ValueError:
        # (not the client's own words: they may quote part of a password)
        raise ValueError("not a Redis URL the client can read: check its port, db and query") from None
    if db is not None and not 0 <= int(db) <= MAX_REDIS_DB:  # what a Redis server has unless told otherwise
        raise ValueError(f"its db must be 0-{MAX_REDIS_DB}, as REDIS_DB's")
    return v


def check_webhook_urls(v: str) -> str:
    # Named by place, never quoted: a URL holds its receiver's token (a Slack hook's path, a password).
    for i, url in enumerate(split_list(v)):
        if not re.match(r"^https?://[^\s/?#]+", url):
            raise ValueError(f"WEBHOOK_URLS[{i}] (counting from 0) is not an http(s) URL: start it with http:// or "
                             "https://")  # fmt: skip
        try:
            port = urlsplit(url).port
        except ValueError:
            port = 0
        if port == 0:
            raise ValueError(f"WEBHOOK_URLS[{i}] (counting from 0) has a port that is not 1-65535")
    return v


def split_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


@lru_cache(maxsize=32)  # every create resolves its paths against the roots: parse each setting once
def parse_roots(value: str, base: Path) -> tuple[Path, ...]:
    """`a, ~/b` -> the folders; a relative one is under `base` (the project's root)."""
    out: list[Path] = []
    for part in value.split(","):
        part = part.strip()
        if part:
            try:
                p = Path(part).expanduser()
            except RuntimeError:  # ~user of no such user: one line naming the setting, not a traceback
                raise ValueError(f"{part!r}: cannot expand '~' here: give the folder's full path") from None
            out.append(p if p.is_absolute() else base / p)
    return tuple(out)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_RATE_RE = re.compile(r"^\s*(\d{1,9})\s*(?:/\s*(second|minute|hour|day))?\s*\Z")
_RATE_PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}


def parse_rate(value: str) -> tuple[int, float] | None:
    """`30/minute` -> (30, 60.0); `0` -> None (no limit)."""
    m = _RATE_RE.match(value)
    if not m or (m.group(1) != "0" and not m.group(2)):
        raise ValueError("must be a count per period, such as 30/minute or 1000/hour, or 0 for no limit")
    count = int(m.group(1))
    return None if count == 0 else (count, _RATE_PERIODS[m.group(2)])


_SIM_RE = re.compile(r"^\s*(\d{1,3})\s*(?:[xX]\s*(\d+(?:\.\d+)?))?\s*\Z")
SIMULATED_GPUS_MAX = 64


def parse_simulated_gpus(value: str) -> tuple[float, ...]:
    """Each simulated GPU's GiB, in index order: `4` -> 4 GPUs of 80 GiB; `4x24` -> 4 of 24 GiB; `2x80,2x24` -> two
    of 80 GiB, then two of 24 GiB."""
    sizes: list[float] = []
    for group in value.split(","):
        m = _SIM_RE.match(group)
        if not m:
            raise ValueError("must be a GPU count, optionally with GiB per GPU, such as 4 or 4x80, or groups of them "
                             "such as 2x80,2x24")  # fmt: skip
        memory = float(m.group(2)) if m.group(2) else 80.0
        if memory <= 0:
            raise ValueError("must give each GPU a positive GiB size, such as 4 or 4x80")
        sizes += [memory] * int(m.group(1))
    if len(sizes) > SIMULATED_GPUS_MAX:
        raise ValueError(f"must be 0-{SIMULATED_GPUS_MAX} GPUs in all, such as 4 or 4x80")
    return tuple(sizes)


def parse_visible_devices(value: str) -> tuple[tuple[str, ...], str | None]:
    """CUDA_VISIBLE_DEVICES as the scheduler honours it: the GPUs it may use, by index as nvidia-smi numbers them
    (PCI bus order, as runs see them) or by uuid (GPU-..., or a unique start of one). Read as CUDA reads it: up to
    the first entry it cannot take (-1, NoDevFiles: none), which is returned with why; '' hides every GPU."""
    kept: list[str] = []
    for entry in (e.strip() for e in value.split(",")) if value.strip() else ():
        if entry.startswith("MIG-"):
            return tuple(kept), f"{entry} is a MIG instance: the scheduler gives runs whole GPUs"
        if not (entry.isdigit() or (entry.startswith("GPU-") and len(entry) > 4)):
            return tuple(kept), f"{entry!r} is no GPU index (0, 1, ...) nor GPU uuid (GPU-...)"
        kept.append(entry)
    return tuple(kept), None


def check_networks(v: str) -> str:
    """FORWARDED_ALLOW_IPS: addresses or networks, comma-separated, or '*'."""
    for entry in split_list(v):
        if entry != "*":
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an address or a network (for example 127.0.0.1,10.0.0.0/8 "
                                 "or *)") from None  # fmt: skip
    return v


def describe_error(error: dict[str, Any], secret: frozenset[str]) -> str:
    """One readable line for a settings validation error (a secret's value is not shown)."""
    key = ".".join(str(p) for p in error.get("loc", ())) or "settings"
    ctx = error.get("ctx") or {}
    if error.get("type") == "literal_error" and "expected" in ctx:
        allowed = ctx["expected"]
    elif error.get("type") == "enum" and "expected" in ctx:
        allowed = ctx["expected"]
    else:
        allowed = None
    msg = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if not error.get("loc"):
        return f"invalid settings: {msg}"  # a rule across keys; its input would be every value, secrets too
    got = "***" if key in secret else repr(error.get("input"))
    text = f"invalid setting {key}={got}: {msg}"
    if allowed and str(allowed) not in msg:
        text += f" (allowed: {allowed})"
    return text
