"""Why a queued job waits (Slurm's REASON column): the codes, the words for each, and how a wait is written."""

from __future__ import annotations

import math
from dataclasses import dataclass

REASON_TEXT = {
    "priority": "jobs ahead of it in the queue go first",
    "resources": "not enough free GPUs",
    "reservation": "the free GPUs it could use are held for a job ahead of it",
    "outside_processes": "GPUs it needs are busy with processes the server did not start",
    "gpu_unreadable": "GPUs it needs could not be read (NVML or the simulated GPU file failed): see GET /gpus",
    "owner_limit": "its owner is at MAX_GPUS_PER_OWNER or MAX_RUNNING_PER_OWNER, with its jobs ahead in the queue",
    "never": "this request can never be met on these GPUs (GET /gpus: fewer, smaller or other GPUs than it "
    "names): it starts if such GPUs come back; else cancel it (POST .../stop) and create it again with num_gpus, "
    "gpu_ids or min_gpu_memory_gb they meet",
    "preemption": "lower-priority runs make way for it (PREEMPTION)",
    "retry_backoff": "a retried run waits a while before it may start again (RETRY_BACKOFF_SECONDS)",
}


@dataclass(frozen=True, slots=True)
class Reason:
    """Why a queued job waits (Slurm's REASON): a code from REASON_TEXT, and the job holding the GPUs it
    could use with when that job should start (seconds from now), for a reservation; for a preemption, the first
    run to make way, when, and how many more do."""

    code: str
    job_id: str | None = None
    starts_in: float | None = None
    more: int = 0
    gpu_cap: int | None = None  # never: more GPUs than MAX_GPUS_PER_OWNER (lowered since its create)
    # never: GPU_MIN_FREE_MEMORY_GB past the memory of the GPUs it could use (raised since its create), which no
    # request of its user's could change (hunt CE)
    min_free_gb: float | None = None

    @property
    def text(self) -> str:
        if self.code == "never" and self.gpu_cap is not None:
            return (f"it asks for more GPUs than its owner may hold (MAX_GPUS_PER_OWNER={self.gpu_cap}): cancel it "
                    f"(POST .../stop) and create it again with num_gpus of {self.gpu_cap} or fewer")  # fmt: skip
        if self.code == "never" and self.min_free_gb is not None:
            return (f"the server's setting GPU_MIN_FREE_MEMORY_GB={self.min_free_gb:g} (the memory a GPU must have "
                    "free to take a job) is more than enough of the GPUs this job could use offer: its operator "
                    "must lower the setting, and the job then starts by itself")  # fmt: skip
        if self.code == "reservation" and self.job_id is not None:
            if self.starts_in is None:
                return f"GPUs held for {self.job_id}, whose start depends on a run of unknown length"
            return (
                f"GPUs held for {self.job_id}, which should start in about {format_wait(self.starts_in)[6:]}"
                if self.starts_in >= 60
                else f"GPUs held for {self.job_id}, which should start within a minute"
            )
        if self.code == "preemption" and self.job_id is not None:
            runs = f"lower-priority run {self.job_id}" + (f" and {self.more} more" if self.more else "")
            if self.starts_in is None or self.starts_in < 1:
                return (f"{runs} will make way for it (preempted: back to the queue, to resume from its last "
                        "checkpoint, or from the beginning without one)")  # fmt: skip
            return (f"{runs} will make way for it once preemptible (PREEMPTION_MIN_RUN_SECONDS), in "
                    f"{format_wait(self.starts_in).removeprefix('about ')}")  # fmt: skip
        if self.code == "retry_backoff" and self.starts_in is not None:
            return (
                f"its run failed and was retried: it waits {format_wait(self.starts_in)} more before it may "
                "start again (RETRY_BACKOFF_SECONDS, doubled at each retry), in case what failed it was passing"
            )
        return REASON_TEXT[self.code]


def format_wait(seconds: float) -> str:
    """'less than a minute', 'about 5 min', 'about 1 h 20 min', 'about 2 d 3 h'."""
    if not math.isfinite(seconds):
        raise ValueError(f"wait must be a finite number of seconds, got {seconds}")
    if seconds < 60:
        return "less than a minute"
    minutes = math.floor(seconds / 60 + 0.5)
    if minutes < 60:
        return f"about {minutes} min"
    hours, mins = divmod(minutes, 60)
    if hours < 24:
        return f"about {hours} h {mins} min" if mins else f"about {hours} h"
    # Past a day, minutes are noise next to the estimates they come from.
    hours = math.floor(seconds / 3600 + 0.5)
    days, hours = divmod(hours, 24)
    return f"about {days} d {hours} h" if hours else f"about {days} d"
