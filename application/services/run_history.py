"""Finished runs' speed and durations in Redis, and the predictions made from them (see `predictions`)."""

from __future__ import annotations

import json
import re
from typing import Any

import redis.asyncio as aioredis
from loguru import logger
from redis.exceptions import (
    AuthenticationError,
    ExecAbortError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
)

from application.models.training_model import Job, PredictedDuration, Progress
from application.services.keys import Keys
from application.services.lost_replies import never_sent
from application.services.predictions import (
    StepSample,
    hub_rows,
    plan_steps,
    predict,
    profile_key,
    similar_key,
    step_sample,
)

# Samples kept per key: predictions read the newest few; the rest shows a change of hardware or code.
KEEP = 20
ERRORS_KEEP = 1000
# A kind of run not seen again for this long is forgotten: the keys are one per model, data set, GPU count and
# training settings (each list capped at KEEP), so without an end their number grows with every variation tried.
HISTORY_TTL_SECONDS = 180 * 86400
# Refusals that abort the whole transaction, so nothing of a sample was written: it may be written again. (An
# error in EXEC itself, a WRONGTYPE say, leaves the other commands applied: again, it would count twice. Review CM.)
REFUSED = (ExecAbortError, OutOfMemoryError, ReadOnlyError, NoPermissionError, AuthenticationError)
# (redis-py words a refusal in a MULTI as "Command # 1 (LPUSH ...) of pipeline caused error: MISCONF ...": review CO)
REFUSED_CODES = re.compile(r"\b(MISCONF|NOREPLICAS)\b")
# Predictions remembered per process while no run ends (teams submit the same jobs again and again).
CACHE_SIZE = 1024


def samples_per_step(job: Job) -> int:
    t = job.training
    return t.batch_size * t.gradient_accumulation_steps * max(1, job.num_gpus)


def steps_of(job: Job) -> int | None:
    t = job.training
    # `#N` is what swift trains on (N rows sampled, or the set repeated up to N), a local file's count or not.
    sampled = hub_rows(job.data_path)
    rows = sampled if sampled is not None else job.dataset_rows
    return plan_steps(
        max_steps=t.max_steps, num_epochs=t.num_epochs, rows=rows, split_ratio=t.split_dataset_ratio,
        batch_size=t.batch_size, grad_accum=t.gradient_accumulation_steps, num_gpus=job.num_gpus,
    )  # fmt: skip


def keys_of(job: Job) -> tuple[str, str]:
    t = job.training
    return (profile_key(job.model_path, job.num_gpus, t.max_length, t.train_type),
            similar_key(job.model_path, job.data_path, job.num_gpus, t.model_dump(mode="json")))  # fmt: skip


class RunHistory:
    """Finished runs (written by runners) and the predictions made from them (API workers, scheduler)."""

    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.r: Any = client
        self.keys = keys
        # (history version, {(profile, similar, steps, samples per step): prediction}): a prediction changes only
        # when a run ends (`record` bumps the version), so while the version a caller read stays the same the
        # history need not be read again.
        self._cache: tuple[int, dict[tuple[str, str, int | None, int], PredictedDuration]] = (-1, {})

    async def predict(self, job: Job, version: int | None = None) -> PredictedDuration:
        """The best prediction for a job not started yet: its time limit, its plan, or similar jobs' history.
        `version` (the history version, read by the caller with its other reads) lets a repeat skip Redis."""
        if job.time_limit_seconds is not None:
            return PredictedDuration(seconds=float(job.time_limit_seconds), source="time_limit")
        profile, similar = keys_of(job)
        steps, per_step = steps_of(job), samples_per_step(job)
        key = (profile, similar, steps, per_step)
        if version is not None and self._cache[0] == version and key in self._cache[1]:
            return self._cache[1][key].model_copy()
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.lrange(self.keys.step_profile(profile), 0, KEEP - 1)
            pipe.lrange(self.keys.run_durations(similar), 0, KEEP - 1)
            raw_profile, raw_durations = await pipe.execute()
        samples = [StepSample(*json.loads(x)) for x in raw_profile]
        found = predict(time_limit=None, steps=steps, samples_per_step=per_step, profile=samples,
                        durations=[float(x) for x in raw_durations])  # fmt: skip
        result = PredictedDuration(seconds=found.seconds, source=found.source) if found else PredictedDuration()
        if version is not None:
            if self._cache[0] != version or len(self._cache[1]) >= CACHE_SIZE:
                self._cache = (version, {})
            self._cache[1][key] = result
        return result

    async def record(self, job: Job, duration: float, steps: int | None, seconds_per_step: float | None) -> None:
        """A run that completed: its speed (when it took steps), its duration, and how far off its prediction was."""
        profile, similar = keys_of(job)
        sample = step_sample(duration, steps or 0, seconds_per_step, samples_per_step(job))
        predicted = job.queued_prediction.seconds if job.queued_prediction else None
        async with self.r.pipeline(transaction=True) as pipe:
            if sample is not None:
                pipe.lpush(self.keys.step_profile(profile), json.dumps([sample.seconds_per_sample, sample.overhead]))
                pipe.ltrim(self.keys.step_profile(profile), 0, KEEP - 1)
                pipe.expire(self.keys.step_profile(profile), HISTORY_TTL_SECONDS)
            pipe.lpush(self.keys.run_durations(similar), repr(round(duration, 3)))
            pipe.ltrim(self.keys.run_durations(similar), 0, KEEP - 1)
            pipe.expire(self.keys.run_durations(similar), HISTORY_TTL_SECONDS)
            if predicted:
                pipe.lpush(self.keys.prediction_errors, repr(round(duration / predicted, 4)))
                pipe.ltrim(self.keys.prediction_errors, 0, ERRORS_KEEP - 1)
            pipe.incr(self.keys.history_version)
            await pipe.execute()

    async def learn(self, job: Job, duration: float, progress: Progress | None, runtime: float | None) -> bool:
        """Teach the predictions what this completed run took (`record`, from its progress); False when that
        should be tried again: refused, or never sent, so not made (a lost reply's may have been, and twice would
        skew the predictions)."""
        steps = (progress.current_step or progress.max_steps) if progress else None
        per_step = runtime / steps if runtime and steps else progress.train_speed if progress else None
        try:
            await self.record(job, duration, steps, per_step)
        except RedisError as exc:
            logger.warning("could not record the run's duration for predictions: {}", exc)
            return not (isinstance(exc, REFUSED) or REFUSED_CODES.search(str(exc)) or never_sent(exc))
        return True

    async def ratios(self) -> list[float]:
        return [float(x) for x in await self.r.lrange(self.keys.prediction_errors, 0, ERRORS_KEEP - 1)]
