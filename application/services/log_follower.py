"""A run's log followed by its runner: what the log gained since the last read, parsed, and queued in the outbox
(progress, the loss history, checkpoints and their events) for the runner to write to Redis."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from application.models.training_model import PredictedDuration, Progress
from application.services import clock
from application.services.log_parser import SwiftLogParser
from application.services.outbox import Outbox
from application.utils.log_tail import read_from

CHUNK = 4 * 1024 * 1024
# What one pass of a runner's loop parses of the log at most: a log written faster than it can be parsed must
# not hold off the stop, time-limit and heartbeat checks between reads (the passes then come without a pause).
READ_BUDGET = 256 * 1024


class LogFollower:
    """Reads what the run's log gained since the last read and queues what it says in the outbox."""

    def __init__(self, log_file: Path, parser: SwiftLogParser, outbox: Outbox, started_at: float,
                 limit: int | None = None, checkpoints: Sequence[str] = ()) -> None:  # fmt: skip
        """`checkpoints`: the job's as its earlier runs left them; each one this run saves is added to them."""
        self.log_file = log_file
        self.checkpoints = list(checkpoints)
        self.rotating = False  # a checkpoint was saved, and no step logged since: older ones may yet be removed
        self.parser = parser
        self.outbox = outbox
        self.started_at = started_at
        self.limit = limit  # the run's time limit: it is stopped then, whatever swift expects
        self.offset = 0

    def read(self, budget: int | None = None) -> bool:
        """Take what the log gained, `budget` bytes of it at most (None: all); True when more is waiting."""
        taken = 0
        while True:
            size = CHUNK if budget is None else min(CHUNK, budget - taken)
            data, self.offset = read_from(self.log_file, self.offset, size, in_place=True)
            if not data:
                return False
            self._take(self.parser.feed(data))
            taken += len(data)
            if len(data) < size:
                return False
            if budget is not None and taken >= budget:
                return True

    def flush(self) -> None:
        self._take(self.parser.flush())  # a last line with no newline after it

    def _take(self, result: Any) -> None:
        progress: Progress | None = result.progress
        fields: dict[str, Any] = {"log_offset": self.offset}
        if progress is not None:
            fields["progress"] = progress
            if progress.remaining_seconds is not None:
                # swift's own estimate beats any prediction made before the run.
                seconds = round(max(0.0, clock.now() - self.started_at) + progress.remaining_seconds, 3)
                # (past its limit the run is stopped: the limit is then what the prediction is, and says so)
                predicted = PredictedDuration(seconds=seconds, source="progress")
                if self.limit is not None and seconds > self.limit:
                    predicted = PredictedDuration(seconds=float(self.limit), source="time_limit")
                fields["predicted_duration"] = predicted
        if self.parser.run_dir:
            fields["run_dir"] = self.parser.run_dir
        if self.parser.last_checkpoint or result.checkpoints_saved:
            fields["last_checkpoint"] = self.parser.last_checkpoint or result.checkpoints_saved[-1]
        if result.checkpoints_saved:
            fields["last_checkpoint_at"] = clock.now()  # what a preemption would lose is counted from here
            self.checkpoints += [c for c in result.checkpoints_saved if c not in self.checkpoints]
        if result.checkpoints_saved or self.rotating:
            # The job's list, beside its last_checkpoint, while the run goes on (its end writes what is on disk):
            # less those save_total_limit removed (review EQ). swift removes them once the save it has said is
            # written, which takes a while (an optimizer's state, DeepSpeed's lines meanwhile): looked at again at
            # each read until a step is logged after it (review EU).
            kept = [c for c in self.checkpoints if os.path.isdir(c)]
            if kept != self.checkpoints or result.checkpoints_saved:
                self.checkpoints = kept
                fields["checkpoints"] = list(kept)
            self.rotating = bool(result.checkpoints_saved) or (self.rotating and progress is None)
        if self.parser.best_checkpoint:
            fields["best_checkpoint"] = self.parser.best_checkpoint
        if self.parser.train_loss is not None:
            fields["train_loss"] = self.parser.train_loss
        if self.parser.train_runtime is not None:
            fields["train_runtime"] = self.parser.train_runtime
        self.outbox.set(**fields)
        self.outbox.add_history(result.history)
        for path in result.checkpoints_saved:
            self.outbox.event("checkpoint_saved", f"checkpoint saved: {path}", {"path": path})
        if result.diverged_at is not None:
            # The loss shows no value from here on (no number to plot or store): this says why.
            self.outbox.event("loss_not_finite", f"training loss is not a number at step {result.diverged_at}: the "
                              "run diverged (a lower learning_rate, gradient clipping or bf16 may help)",
                              {"step": result.diverged_at})  # fmt: skip
