"""A job's checkpoints across all its runs, as GET /jobs/{id}/checkpoints shows them (blocking: disk reads)."""

from __future__ import annotations

import bisect
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from application.models.job_responses import CheckpointInfo, CheckpointList
from application.models.training_model import ExportStatus, Job, LossPoint
from application.services import clock
from application.services.path_sandbox import escaped_output_root
from application.services.run_end import checkpoint_step
from application.services.run_outputs import job_checkpoints

# A checkpoint folder holds a dozen files; a bound keeps a strange one from costing a long walk.
MAX_FILES = 10_000


def weights_only(checkpoint: str) -> bool:
    """Saved with save_only_model: no optimizer or scheduler state, so a resume restarts both (blocking)."""
    return not (Path(checkpoint) / "scheduler.pt").is_file()


def holds_weights(job: Job, checkpoint: str) -> bool:
    """A LoRA job's checkpoint holds its adapter (blocking): a save a stop cut short leaves an empty checkpoint-N,
    which swift's export refuses ("is not an adapter"). PEFT writes the weights, then adapter_config.json: a
    full disk left that empty, after no weights at all (hunt BW: listed complete, and exported)."""
    if job.training.train_type == "full":
        return True
    try:
        config = (Path(checkpoint) / "adapter_config.json").stat()
    except OSError:
        return False
    return stat.S_ISREG(config.st_mode) and config.st_size > 0 and _adapter_weights(Path(checkpoint))


# PEFT's adapter weights, as safetensors (its default) or a torch pickle.
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def _adapter_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ADAPTER_WEIGHTS)


def first_resumable(paths: Iterable[str | None]) -> str | None:
    """The first of `paths` swift can resume from: its trainer_state.json is still on disk, and an adapter's
    weights beside its adapter_config.json (one whose weights were deleted was resumed from, and swift failed
    reading the folder as a hub id: hunt CY)."""
    return next((p for p in paths if p and (Path(p) / "trainer_state.json").is_file() and _whole_adapter(Path(p))),
                None)  # fmt: skip


def _whole_adapter(folder: Path) -> bool:
    return not (folder / "adapter_config.json").exists() or _adapter_weights(folder)


def newest_checkpoint(job: Job) -> str | None:
    """The checkpoint a resume would use: the newest of the job's still on disk."""
    return first_resumable(reversed(job.checkpoints))


def folder_size(path: Path) -> int | None:
    total, seen = 0, 0
    stack = [path]
    try:
        while stack:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    seen += 1
                    if seen > MAX_FILES:
                        return None
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                    elif entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
    except OSError:
        return None
    return total


def _loss_at(history: list[LossPoint], step: int | None) -> float | None:
    """The training loss logged at `step` or nearest before it (checkpoints land between logging steps).
    `history`: sorted by step (stable: of two points at one step, the later counts).

    An evaluation's point has no loss of its own and is passed over; a training step's point without one (it has
    a learning rate) logged a loss that was not a number: None, not the last finite loss before it, which made
    checkpoints saved after a divergence look as healthy as the last one before it."""
    if step is None:
        return None
    i = bisect.bisect_right(history, step, key=lambda p: p.step)
    while i > 0:
        i -= 1
        point = history[i]
        if point.loss is not None or point.learning_rate is not None:
            return point.loss
    return None


def own_checkpoints(job: Job, output_root: Path) -> list[str]:
    """The checkpoints of this job's runs, oldest first (blocking): not those an earlier job left in its folder.
    A job that ran but whose run folders are unknown (swift ended before it named one) has none, and so has one
    whose folder a symlink now leads elsewhere (as its files are not listed: `escaped_output_root`)."""
    return [] if escaped_output_root(Path(job.output_dir), output_root) else _run_checkpoints(job)


def _run_checkpoints(job: Job) -> list[str]:
    run_dirs = [a.run_dir for a in job.attempts] + [job.run_dir]
    if (job.attempts or job.started_at is None) and not any(run_dirs):
        return []  # (one that never ran has none: a deleted job's, in the folder it reuses, are not its own)
    return job_checkpoints(Path(job.output_dir), run_dirs)


def describe_checkpoints(job: Job, output_root: Path, history: list[LossPoint], limit: int = 1000,
                         offset: int = 0) -> CheckpointList:  # fmt: skip
    """The newest `limit` checkpoints but the newest `offset` (oldest first), each looked at on disk (its size: a
    walk of its folder)."""
    not_read = escaped_output_root(Path(job.output_dir), output_root)  # (own_checkpoints', said why)
    every = [] if not_read else _run_checkpoints(job)
    resume = first_resumable(reversed(every))
    end = max(0, len(every) - offset)
    paths = every[max(0, end - limit) : end]
    history = sorted(history, key=lambda p: p.step)
    # Every checkpoint a kept merge export completed from: a later export of another one does not undo it. The
    # newest of them is "the" exported one (the current export's may have failed, or still run).
    completed = [e for e in (*job.exports, job.export) if e.status == ExportStatus.COMPLETED and not e.job_id]
    merged = {e.checkpoint for e in completed}
    exported = max(completed, key=lambda e: e.finished_at or 0.0).checkpoint if completed else None
    out = []
    for path in paths:
        folder = Path(path)
        try:
            # (on the shared clock, as the job's started_at: a host whose clock was 90 s behind Redis's showed its
            # checkpoints saved before the run began: hunt BH)
            when: float | None = clock.from_local(folder.stat().st_mtime)
        except OSError:
            continue  # removed meanwhile (save_total_limit)
        attempt = next((a.number for a in reversed(job.attempts) if a.run_dir and path.startswith(a.run_dir + "/")),
                       job.attempts[-1].number if job.attempts and job.run_dir and path.startswith(job.run_dir + "/")
                       else None)  # fmt: skip
        step = checkpoint_step(path)
        out.append(CheckpointInfo(path=path, step=step, attempt=attempt, run_dir=str(folder.parent), time=when,
                                  loss=_loss_at(history, step), size_bytes=folder_size(folder),
                                  resume=path == resume, exported=path in merged,
                                  complete=holds_weights(job, path)))  # fmt: skip
    return CheckpointList(job_id=job.job_id, checkpoints=out, total=len(every), offset=offset, resume_from=resume,
                          exported=exported, not_read=not_read)  # fmt: skip
