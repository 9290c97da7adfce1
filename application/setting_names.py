"""Names that look meant as settings but are none: told at start, since pydantic-settings ignores them."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path

from dotenv import dotenv_values

from application.config import Settings

# Other tools' variables, one letter from ours (NVIDIA_VISIBLE_DEVICES, which container runtimes set, was taken for
# a misspelt CUDA_VISIBLE_DEVICES: review DP).
# A typo of CUDA_VISIBLE_DEVICES itself still gets its hint (review DQ).
_DEVICES = re.compile(r"(?!CUDA_)[A-Z0-9_]*_VISIBLE_DEVICES|(NVIDIA|NCCL|HIP|ROCR|ROCM)_[A-Z0-9_]*")


def unknown_settings(env_file: Path | None, environ: Mapping[str, str]) -> list[str]:
    """What looks meant as a setting but is none: each key of the env file that is not a setting, and each
    environment variable a letter or two (or only its case) away from one. Both are ignored, so without a word the
    default was used instead (QUEUE_POLCY=strict ran the backfill policy)."""
    known = set(Settings.model_fields)
    by_case = {k.lower(): k for k in known}

    def guess(name: str) -> str | None:
        close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.85)
        return by_case.get(name.lower()) or (close[0] if close else None)

    found: list[str] = []
    for name in dotenv_values(env_file) if env_file is not None else ():
        if name not in known:
            hint = guess(name)
            found.append(f"{env_file}: {name} is not a setting" + (f" (did you mean {hint}?)" if hint else ""))
    for name in sorted(environ):
        hint = None if name in known or _DEVICES.fullmatch(name.upper()) else guess(name)
        if hint:
            found.append(f"the environment variable {name} is not a setting (did you mean {hint}?)")
    return found
