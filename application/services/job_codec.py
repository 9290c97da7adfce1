"""How a job and what goes with it are written to Redis: hash fields as JSON, script arguments, queue metadata."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from json.encoder import encode_basestring_ascii
from typing import Any

from application.models.training_model import Job

# json.dumps with non-default separators builds a new encoder on every call: one, reused, is much cheaper.
_strict = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def encode(value: Any) -> str:
    """JSON as every client parses it: NaN and Infinity (a diverged run's loss) are not JSON, and written into
    a job they made its page and every list page holding it unreadable; they are written as null."""
    try:
        return _strict(value)
    except ValueError:
        return _strict(_finite(value))


# Most fields are plain scalars: written as json.dumps would, without its encoder machinery (a job has ~60).
_SCALARS: dict[type, Callable[[Any], str]] = {
    str: encode_basestring_ascii,
    int: int.__repr__,
    bool: lambda v: "true" if v else "false",
    type(None): lambda _: "null",
}


def encode_value(value: Any) -> str:
    scalar = _SCALARS.get(type(value))
    if scalar is not None:
        return scalar(value)
    if type(value) is float and math.isfinite(value):
        return float.__repr__(value)
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    elif isinstance(value, list) and value and hasattr(value[0], "model_dump"):
        value = [v.model_dump(mode="json") for v in value]
    elif isinstance(value, Enum):
        value = value.value
    return encode(value)


def encode_fields(fields: Mapping[str, Any]) -> dict[str, str]:
    return {name: encode_value(value) for name, value in fields.items()}


def decode_job(raw: Mapping[str, str]) -> Job:
    # One JSON document, parsed once in Rust, instead of a json.loads per field.
    return Job.model_validate_json("{" + ",".join(f'"{k}":{v}' for k, v in raw.items()) + "}")


def event_payload(
    event_type: str, message: str, data: Mapping[str, Any] | None, actor: str, now: float
) -> dict[str, str]:
    return {"type": event_type, "message": message, "time": repr(now), "actor": actor,
            "data": json.dumps(dict(data or {}))}  # fmt: skip


_PLAIN = frozenset((str, int, float, bool, list))


def _pruned(a: Mapping[str, Any]) -> dict[str, Any]:
    # (a plain value's type looked up first: an isinstance check against the Mapping ABC for each of a job's
    # ~60 encoded fields was 4 % of a create's CPU)
    return {k: v if type(v) in _PLAIN else _pruned(v) if isinstance(v, Mapping) else v for k, v in a.items()
            if v is not None}  # fmt: skip


def script_arg(a: Mapping[str, Any]) -> str:
    # cjson turns null into a truthy sentinel: what a script must see as absent is left out instead.
    return encode(_pruned(a))


@dataclass(frozen=True)
class QueueMeta:
    """What the scheduler needs of a queued job, kept beside the queue so a pass reads no job hashes."""

    priority: int
    submitted_at: float
    num_gpus: int
    gpu_ids: list[int] | None
    min_gpu_memory_gb: float | None
    estimated_duration: float | None = None
    owner: str | None = None
    retry_at: float | None = None  # a retried run's: not started before then

    def encode(self) -> str:
        items = [self.priority, self.submitted_at, self.num_gpus, self.gpu_ids, self.min_gpu_memory_gb,
                 self.estimated_duration, self.owner]  # fmt: skip
        if self.retry_at is not None:  # (an 8th item only when there is one: most entries keep the 7 of before)
            items.append(self.retry_at)
        return json.dumps(items, separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str) -> QueueMeta:
        return cls.of_items(json.loads(raw))

    @classmethod
    def of_items(cls, items: list[Any]) -> QueueMeta:
        # (items a later version appends are not this one's: a retry's 8th broke the versions before it: review DU)
        return cls(*items[:8])

    @classmethod
    def of(cls, job: Job, priority: int | None = None, *, retry_at: float | None = None) -> QueueMeta:
        return cls(job.priority if priority is None else priority, job.created_at, job.num_gpus,
                   job.gpu_ids_requested, job.min_gpu_memory_gb, job.predicted_duration.seconds,
                   owner=job.owner, retry_at=retry_at)  # fmt: skip
