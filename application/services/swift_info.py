"""What the installed ms-swift knows: its version, argument fields and model registry (from `swift_probe`).

The probe imports ms-swift in its own environment (about 7 s), so its answer is cached on disk per
ms-swift version and swift executable, and read again in milliseconds on the next start.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from application.services.swift_command import interpreter_of, probe_env

PROBE_SCRIPT = Path(__file__).resolve().parent.parent / "swift_probe.py"


@dataclass(frozen=True)
class ModelType:
    template: str | None
    candidates: tuple[str, ...]
    architectures: tuple[str, ...]
    multimodal: bool


@dataclass(frozen=True)
class SwiftInfo:
    version: str
    arguments: dict[str, dict[str, dict[str, Any]]]
    # lower-cased model folder name -> (model_type, template of its group or None)
    names: dict[str, tuple[str, str | None]]
    types: dict[str, ModelType]
    templates: frozenset[str]
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # what the probe printed

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SwiftInfo:
        models = data.get("models") or {}
        return cls(
            raw=data,
            version=str(data.get("version") or ""),
            arguments=data.get("arguments") or {},
            names={k: (v[0], v[1]) for k, v in (models.get("names") or {}).items()},
            types={
                k: ModelType(
                    v.get("template"),
                    tuple(v.get("candidates") or ()),
                    tuple(v.get("architectures") or ()),
                    bool(v.get("multimodal")),
                )
                for k, v in (models.get("types") or {}).items()
            },
            templates=frozenset(models.get("templates") or ()),
        )

    def types_for_architecture(self, architecture: str | None) -> list[str]:
        """ms-swift's guess from config.json's first architecture (a model with none matches 'null')."""
        arch = architecture or "null"
        return [name for name, t in self.types.items() if arch in (t.architectures or ("null",))]


def usable(swift_bin: str) -> tuple[bool, str | None]:
    """Whether `swift_bin` can be run at all (else every job would end with exit code 127), and why not."""
    path = shutil.which(swift_bin)
    if path is None:
        exists = os.path.exists(swift_bin)
        return False, (f"SWIFT_BIN={swift_bin} is not executable" if exists else
                       f"SWIFT_BIN={swift_bin} was not found (install ms-swift: ./install_all.sh)")  # fmt: skip
    return True, None


def cache_file(swift_bin: str, version: str | None, cache_dir: Path) -> Path | None:
    """Where the probe's answer for this swift and version is kept. The probe script's own text is part of the
    name: a server upgraded to a probe that reports more (choices it did not know) probes again."""
    python = interpreter_of(swift_bin)
    if python is None:
        return None
    tag = hashlib.sha256(f"{python}\0{swift_bin}\0".encode() + _probe_text()).hexdigest()[:16]
    return cache_dir / f"{version or 'unknown'}-{tag}.json"


@functools.cache
def _probe_text() -> bytes:
    return PROBE_SCRIPT.read_bytes()


def probe(swift_bin: str, version: str | None, cache_dir: Path, timeout: float = 180.0) -> SwiftInfo | None:
    """The installed ms-swift's info, from the cache or by running the probe; None when it cannot be had."""
    python = interpreter_of(swift_bin)
    cache = cache_file(swift_bin, version, cache_dir)
    if python is None or cache is None:
        return None
    if version and cache.is_file():
        try:
            return SwiftInfo.from_json(json.loads(cache.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError):
            pass
    try:
        out = subprocess.run([python, str(PROBE_SCRIPT)], capture_output=True, text=True, timeout=timeout, check=False,
                             stdin=subprocess.DEVNULL, env=probe_env())  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("ms-swift probe with {} failed: {}", python, exc)
        return None
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        logger.info("ms-swift probe with {} found no ms-swift ({})", python, last[:300])
        return None
    try:
        data = json.loads(out.stdout)
        info = SwiftInfo.from_json(data)
    except (ValueError, KeyError, TypeError) as exc:
        logger.warning("ms-swift probe printed something unreadable: {}", exc)
        return None
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        target = cache_file(swift_bin, info.version, cache_dir) or cache
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        tmp.replace(target)
    except OSError as exc:
        logger.debug("could not cache the ms-swift probe: {}", exc)
    return info
