"""Which GPUs the queued jobs want (a GPU a job names, or one of the few big enough for its memory request): a
job free to choose takes, and a reservation plans on, the least wanted first (`scheduler.plan`)."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

from application.services.owner_caps import OwnerCaps
from application.services.timeline import INF, Timeline

if TYPE_CHECKING:
    from application.services.scheduler import Policy, QueuedJob, RunningJob

# How far down the queue `wanted` looks: a pass over 10,000 queued jobs took 1 ms more under strict for it.
WANTED_LOOKAHEAD = 512


def wanted(queue: Sequence[QueuedJob], running: Sequence[RunningJob], tl: Timeline,
           policy: Policy) -> dict[int, tuple[bool, int]]:  # fmt: skip
    """How much the queued jobs that could start now want each GPU that some of them can use and others cannot:
    whether a job names it (`gpu_ids`), and how many of the `min_gpu_memory_gb` asked above the default it is
    big enough for. A job free to choose takes the least wanted GPUs first: it took the one GPU a job behind
    it named (or the one big card a bigger request needed) and left another idle, and that job waited. Jobs
    that can never start here, or that their owner's limits hold back (as `plan` counts them: in queue order),
    want nothing now."""
    caps = OwnerCaps(policy.owner_gpu_cap, policy.owner_run_cap,
                     ((r.owner, len(r.gpu_ids), None) for r in running), 0.0)  # fmt: skip
    named: set[int] = set()
    needs: set[float] = set()
    for j in itertools.islice(queue, WANTED_LOOKAHEAD):
        k = len(j.gpu_ids) if j.gpu_ids else j.num_gpus
        mem = j.min_gpu_memory_gb
        need = mem if mem is not None and mem > policy.min_free_gb else policy.min_free_gb
        if k == 0 and caps.active:  # (a CPU-only job counts toward its owner's runs at once, as in `plan`)
            if caps.over(j.owner, 0):
                caps.claim(j.owner, 0, None, None)
            else:
                caps.add(j.owner, 0, None)
        if k <= 0 or not tl.feasible(j.gpu_ids, k, need):
            continue
        held_back = caps.over(j.owner, k)
        # As `plan` counts it: a job that waits on GPUs busy outside (or unreadable) takes no share.
        if caps.active and tl.earliest(j.gpu_ids, k, need, policy.min_free_gb)[0] != INF:
            caps.claim(j.owner, k, None, None)
        if held_back:
            continue
        if j.gpu_ids:
            named.update(j.gpu_ids)
        elif need > policy.min_free_gb:
            needs.add(need)
    ordered = sorted(needs)
    # By the memory a job could get there now: an outside process on a free GPU leaves it less than its card.
    wants = {i: (i in named, bisect.bisect_right(ordered, m)) for i, m in tl.cap.items()}
    return {i: w for i, w in wants.items() if w != (False, 0)}
