"""The step dicts and durations ms-swift prints, as values: `{'loss': '8.264', 'global_step/max_steps': '3/20',
...}` (4.x: every value a string; 3.x: numbers, `nan` bare) and '1h 2m 3s' / '01:02' times. Read by `log_parser`;
checked against captured real output (tests/fixtures/swift)."""

from __future__ import annotations

import ast
import json
import math
import re
from typing import Any

# A dict is only a step dict when it has one of these; anything else that looks like a dict repr
# (a config echoed to stdout) is ignored.
_STEP_KEYS = frozenset({"global_step/max_steps", "loss", "eval_loss", "train_runtime", "train_loss"})
_MAX_DICT_CHARS = 100_000
_NUMBER_RE = re.compile(r"[+-]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|nan|inf|infinity)", re.IGNORECASE)
_STEPS_RE = re.compile(r"\s*(\d{1,18})\s*/\s*(\d{1,18})\s*")  # (longer: no step count, and int() raises)


def _to_number(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return finite(value)
    if isinstance(value, str) and _NUMBER_RE.fullmatch(value.strip()):
        return finite(value)
    return value


def finite(value: Any) -> float | None:
    """A finite number, or None: a diverged run's `nan`/`inf` loss is no point to plot (nor valid JSON)."""
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, str) and _NUMBER_RE.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, int | float):
            number = float(value)
            return number if math.isfinite(number) else None
    except OverflowError:  # an int too large for a float (a 400-digit "loss"): no point either
        pass
    return None


def normalize_step_dict(raw: dict[str, Any]) -> dict[str, Any]:
    """One logged step as numbers: numeric strings become floats, '5.00%' becomes 5.0, and
    'global_step/max_steps' ('1/20') also gives 'current_step' and 'max_steps' as ints."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "global_step/max_steps":
            out[key] = value
            m = _STEPS_RE.fullmatch(str(value))
            if m:
                out["current_step"] = int(m.group(1))
                out["max_steps"] = int(m.group(2))
        elif key == "percentage":
            text = str(value).strip().rstrip("%")
            out[key] = finite(text)
        else:
            out[key] = _to_number(value)
    return out


_BARE_NONFINITE_RE = re.compile(r"(:\s*)(-?(?:nan|inf))(?=\s*[,}])")


def _literal(text: str) -> Any:
    # swift's dicts are {'key': 'value' | number, ...}: with no double quote or backslash in them, swapping the
    # quotes makes the same values as JSON, parsed ~10x faster than literal_eval compiles them (anything JSON
    # does not take, such as True or a tuple, goes the slow way).
    if '"' not in text and "\\" not in text:
        try:
            return json.loads(text.replace("'", '"'))
        except (ValueError, RecursionError):
            pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def parse_step_dict(line: str) -> dict[str, Any] | None:
    """The step dict swift prints to stdout (``{'loss': ...}``), normalized; None for anything else.

    The dict may follow tqdm text on the same line (stdout and stderr share one log file).
    """
    text = line.strip()
    start = text.find("{'")
    if start < 0 or not text.endswith("}") or len(text) - start > _MAX_DICT_CHARS:
        return None
    value = _literal(text[start:])
    if value is None:
        # 3.x prints numbers with repr(), so a diverged run gives `'loss': nan`, which is no literal.
        value = _literal(_BARE_NONFINITE_RE.sub(r"\1'\2'", text[start:]))
    if not isinstance(value, dict) or not _STEP_KEYS.intersection(value):
        return None
    if not all(isinstance(k, str) for k in value):
        return None
    return normalize_step_dict(value)


_UNIT_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_MAX_TEXT = 64
_UNITS_RE = re.compile(r"(?:\s*\d+(?:\.\d+)?\s*[dhms])+\s*")
_UNIT_PART_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([dhms])")
_CLOCK_RE = re.compile(r"(?:(\d+)\s*days?,\s*)?(\d+):(\d{1,2}(?:\.\d+)?)(?::(\d{1,2}(?:\.\d+)?))?")


def parse_duration(text: str | None) -> float | None:
    """Seconds in a duration as swift or tqdm print it: '2s', '1h 2m 3s', '1d 0h 5m 0s', '0:01:02',
    '01:02' (tqdm's minutes:seconds), '1 day, 0:00:05'; None when it is none of those."""
    if text is None:
        return None
    s = text.strip()
    if not s:
        return None
    if _UNITS_RE.fullmatch(s):
        return sum(float(num) * _UNIT_SECONDS[unit] for num, unit in _UNIT_PART_RE.findall(s))
    m = _CLOCK_RE.fullmatch(s)
    if m:
        days = float(m.group(1) or 0)
        if m.group(4) is None:
            hours, minutes, seconds = 0.0, float(m.group(2)), float(m.group(3))
        else:
            hours, minutes, seconds = float(m.group(2)), float(m.group(3)), float(m.group(4))
        return days * 86400 + hours * 3600 + minutes * 60 + seconds
    value = finite(s)
    if value is not None and math.isfinite(value) and value >= 0:
        return value
    return None


def format_duration(seconds: float) -> str:
    """One format for every elapsed and remaining time, whether swift ('13m 31s') or tqdm ('08:59') printed it:
    '45s', '13m 31s', '1h 02m 03s', '2d 03h 04m'."""
    total = round(max(0.0, seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def duration_text(text: str) -> str:
    seconds = parse_duration(text)
    if seconds is not None:
        return format_duration(seconds)
    # Text of the log, whose lines a data set's author partly chooses: shown in pages and terminals, so without
    # control characters (literal_eval made '\\x1b' an ESC) and bounded.
    return _CONTROL_RE.sub("", text)[:_MAX_TEXT]
