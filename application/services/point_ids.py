"""The ids of the progress stream's messages, one per loss-history point: `<run>.<step>-<k>`.

A resumed run (pause, preemption, retry) logs again the steps after the checkpoint it starts from, and the points
an earlier run logged for them are dropped as it starts. The step alone then repeats, so an id also names the
run that logged its point (1 for the job's first). Which run that is follows from where each run started: the
history holds, in order, the first run's points up to the second's start, the second's up to the third's, and so
on. `k` tells apart the points of one run at one step (a training and an evaluation point can share it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from application.models.training_model import LossPoint

Key = tuple[int, int, int]  # (run, step, k), in the order the points were logged
BEFORE_ANY: Key = (0, 0, -1)
BARE_STEP = 1_000_000  # `k` of an id that names a step only: every point at that step
POINTS_PER_STEP = 16  # more than swift logs at one step (a training point, an evaluation point)
_ID = re.compile(r"(?:(?P<run>[0-9]{1,9})\.)?(?P<step>[0-9]{1,18})(?:-(?P<k>[0-9]{1,18}))?")


def run_starts(attempts_raw: str | None) -> list[int]:
    """The step each of the job's runs started after (0: from the beginning), oldest first: from the stored
    `attempts` field."""
    attempts = json.loads(attempts_raw) if attempts_raw else None
    return [a.get("first_step") or 0 for a in attempts or []]


def run_of(step: int, starts: Sequence[int]) -> int:
    """The run that logged the point at `step` that the history holds now."""
    for i in range(len(starts) - 1, 0, -1):
        if step > starts[i]:
            return i + 1
    return 1


def keys_of(points: Sequence[LossPoint], starts: Sequence[int]) -> list[Key]:
    seen: dict[tuple[int, int], int] = {}
    keys: list[Key] = []
    for p in points:
        run = run_of(p.step, starts)
        k = seen[(run, p.step)] = seen.get((run, p.step), -1) + 1
        keys.append((run, p.step, k))
    return keys


def format_id(key: Key) -> str:
    return f"{key[0]}.{key[1]}-{key[2]}"


def parse_id(raw: str | None, starts: Sequence[int]) -> Key:
    """A Last-Event-ID as a key; BEFORE_ANY for none or one no stream sends. An id without its run (`<step>-<k>`,
    as this stream sent them before runs were named) is taken as the point the history holds at that step."""
    m = _ID.fullmatch(raw) if raw else None
    if m is None:
        return BEFORE_ANY
    step = int(m["step"])
    run = int(m["run"]) if m["run"] else run_of(step, starts)
    return (run, step, int(m["k"]) if m["k"] else BARE_STEP)


def could_have_sent(last: Key, top: Key, runs: int) -> bool:
    """Whether `last` can be an id this job's stream sent, given its newest point's key and its number of runs.
    A point of an earlier run may have been dropped since (a later run logged its step again); a point of the
    run going now must still be there."""
    if last[0] < max(runs, 1):
        return last[0] >= 1
    if last[0] > top[0]:
        return False
    return last[1] < top[1] or (last[1] == top[1] and (last[2] <= top[2] or last[2] == BARE_STEP))


def rewind_to(last: Key, key: Key, starts: Sequence[int]) -> int | None:
    """The step a client holding points up to `last` must drop the later ones of, before the point `key` of a
    later run: those steps were logged again. None when it holds none of them."""
    if last == BEFORE_ANY or key[0] <= last[0] or key[0] > len(starts):
        return None
    start = min(starts[last[0] : key[0]])  # every run since the client's started after its own checkpoint
    return start if last[1] > start else None
