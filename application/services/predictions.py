"""What the server knows of a job's duration before it runs: pure rules, no Redis, no clock.

Three sources, best first (the first that gives a number wins):

* `time_limit`: the user's own bound (Slurm's). The runner stops a run that exceeds it, so it is a hard upper
  bound and backfill around it is exact.
* `plan`: the job's optimizer steps (`max_steps`, or epochs x ceil(train rows / (batch x grad_accum x GPUs)))
  times what past runs of the same model, GPU count, max_length and train type measured per sample, plus
  their start-up and saving overhead. Seconds per step grow with the batch, so the history keeps seconds per
  sample (per micro-batch row) and a step costs batch x grad_accum of them.
* `history`: a robust recent average of the durations of similar jobs (same model, data set, GPU count and
  training parameters), for when the steps are unknown (a hub data set without '#N').

Tsafrir, Etsion and Feitelson (IEEE TPDS 2007) found the average of a user's last two runs predicts as well as
user estimates for backfill; a median of the last few is the same idea, less hurt by one odd run.
A running job's prediction is replaced by swift's own remaining time (`progress`) once swift prints it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

TIME_LIMIT_MAX = 30 * 86400
# How many recent samples a prediction looks at: recent runs say most about the next one.
RECENT = 5
_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_LIMIT_RE = re.compile(r"(\d+)\s*([dhms])")
_HUB_ROWS_RE = re.compile(r"#(\d+)$")


def parse_time_limit(value: int | str) -> int:
    """Seconds, from an int or text like '90m', '2h', '1h30m', '1d', '45s', '3600'; 1 s to 30 days."""
    if isinstance(value, bool):
        raise ValueError("time_limit must be seconds (an integer) or text like '90m', '2h', '1h30m'")
    if isinstance(value, int):
        seconds = value
    else:
        text = value.strip().lower()
        # ASCII digits only (str.isdigit and \d take any script's), and short: 30 days fit in 8 characters.
        if len(text) > 32 or not text.isascii():
            raise ValueError(f"time_limit {value[:40]!r} is not a duration: use seconds or text like '90m', '2h'")
        if text.isdigit():
            seconds = int(text)
        else:
            parts = _LIMIT_RE.findall(text)
            units = [u for _, u in parts]
            if not parts or _LIMIT_RE.sub("", text).strip() or len(set(units)) != len(units):
                raise ValueError(
                    f"time_limit {value!r} is not a duration: use seconds or text like '90m', '2h', '1h30m'"
                )
            seconds = sum(int(n) * _UNITS[u] for n, u in parts)
    if not 1 <= seconds <= TIME_LIMIT_MAX:
        got = f"{seconds} s" if abs(seconds) < 10**12 else "far more"
        raise ValueError(f"time_limit must be between 1 second and 30 days, got {got}")
    return seconds


def format_limit(seconds: int) -> str:
    """'90 s', '15 min', '2 h', '1 h 30 min', '2 d 4 h' (exact, unlike wait estimates)."""
    d, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    parts = [f"{v} {u}" for v, u in ((d, "d"), (h, "h"), (m, "min"), (s, "s")) if v]
    return " ".join(parts) or "0 s"


def hub_rows(data_path: str) -> int | None:
    """The row count a data set asks for with `#N` ('AI-ModelScope/coco#20000', a local 'train.jsonl#500'), if any."""
    m = _HUB_ROWS_RE.search(data_path)
    return int(m.group(1)) if m else None


def plan_steps(
    *,
    max_steps: int | None,
    num_epochs: float,
    rows: int | None,
    split_ratio: float | None,
    batch_size: int,
    grad_accum: int,
    num_gpus: int,
) -> int | None:
    """Optimizer steps the run will take, or None when the data set's size is unknown.

    Like the Hugging Face Trainer that swift drives: max_steps wins; otherwise each epoch is the training
    rows (after the validation split, 0 by default in ms-swift 4) over the rows one step consumes on all
    ranks, rounded up.
    """
    if max_steps is not None:
        return max_steps
    if rows is None or rows <= 0:
        return None
    train = rows - math.ceil(rows * (split_ratio or 0.0)) if split_ratio else rows
    per_step = batch_size * grad_accum * max(1, num_gpus)
    # (a fraction of an epoch: the Trainer rounds the steps up)
    return max(1, math.ceil(num_epochs * max(1, math.ceil(max(1, train) / per_step))))


def _digest(parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:24]


def profile_key(model_path: str, num_gpus: int, max_length: int, train_type: str) -> str:
    """Which past runs' speed applies: same model, GPU count, max_length and train type."""
    return _digest(["profile", model_path, num_gpus, max_length, train_type])


def similar_key(model_path: str, data_path: str, num_gpus: int, training: dict[str, Any]) -> str:
    """Which past runs' durations apply: same model, data set, GPU count and training parameters."""
    return _digest(["similar", model_path, data_path, num_gpus, training])


@dataclass(frozen=True, slots=True)
class StepSample:
    """One finished run's speed: seconds per sample while training, and the rest of its time (loading the
    model and data, evaluation, saving) in seconds."""

    seconds_per_sample: float
    overhead: float


def recent_average(values: Sequence[float]) -> float | None:
    """A robust recent average of the newest-first `values`: the mean of up to two, the median of more."""
    recent = [v for v in values[:RECENT] if math.isfinite(v) and v >= 0]
    if not recent:
        return None
    if len(recent) <= 2:
        return sum(recent) / len(recent)
    return statistics.median(recent)


def step_sample(
    duration: float, steps: int, seconds_per_step: float | None, samples_per_step: int
) -> StepSample | None:
    """What a finished run taught about speed; None when it says nothing (no steps, no time)."""
    if steps <= 0 or duration <= 0 or samples_per_step <= 0:
        return None
    if seconds_per_step is None or not math.isfinite(seconds_per_step) or seconds_per_step <= 0:
        seconds_per_step = duration / steps  # no speed printed: all its time was steps
    train = min(duration, seconds_per_step * steps)
    return StepSample(seconds_per_sample=train / steps / samples_per_step, overhead=max(0.0, duration - train))


@dataclass(frozen=True, slots=True)
class Prediction:
    seconds: float
    source: str  # "time_limit" | "plan" | "history"


def predict(
    *,
    time_limit: int | None,
    steps: int | None,
    samples_per_step: int,
    profile: Sequence[StepSample],
    durations: Sequence[float],
) -> Prediction | None:
    """The best known duration of a job that has not run yet (see the module's doc for the order)."""
    if time_limit is not None:
        return Prediction(float(time_limit), "time_limit")
    if steps is not None and profile:
        per_sample = recent_average([p.seconds_per_sample for p in profile])
        overhead = recent_average([p.overhead for p in profile])
        if per_sample is not None and overhead is not None:
            return Prediction(round(steps * samples_per_step * per_sample + overhead, 3), "plan")
    average = recent_average(durations)
    if average is not None:
        return Prediction(round(average, 3), "history")
    return None


def ratio_summary(ratios: Sequence[float]) -> dict[str, float | int | None]:
    """Median and p90 of actual/predicted over finished jobs (1.0 = exact; above = ran longer than predicted)."""
    clean = sorted(r for r in ratios if math.isfinite(r) and r > 0)
    if not clean:
        return {"count": 0, "median": None, "p90": None}
    p90 = clean[min(len(clean) - 1, math.ceil(0.9 * len(clean)) - 1)]
    return {"count": len(clean), "median": round(statistics.median(clean), 4), "p90": round(p90, 4)}


def remaining_seconds(
    *, predicted: float | None, started_at: float | None, time_limit: int | None, now: float
) -> float | None:
    """How much longer a running job should hold its GPUs: its prediction (swift's own remaining time once it
    prints one) less what it has run, never past its time limit. None when unknown or overrun: it may end at
    any moment, which is all a reservation may assume."""
    elapsed = max(0.0, now - started_at) if started_at is not None else 0.0
    left = predicted - elapsed if predicted is not None else None
    if time_limit is not None and started_at is not None:
        cap = time_limit - elapsed
        left = cap if left is None else min(left, cap)
    return left if left is not None and left > 0 else None
