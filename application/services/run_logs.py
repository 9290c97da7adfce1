"""A job's run logs in its folder: each run's own (`<job>.train[.N].log`, beside its `.exit.json`), and the runs
they show that the job's record does not know."""

from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Any

from application.models.training_model import Attempt, Job
from application.services import process_group as pg
from application.utils.log_files import path_taken


def log_name(job_id: str, number: int) -> str:
    return f"{job_id}.train.log" if number == 1 else f"{job_id}.train.{number}.log"


def run_log(log_dir: Path, job_id: str, number: int) -> Path:
    """The log of a job's `number`-th run, a file of its own: a resumed run's log starts empty and the earlier
    ones stay (attempts[].log_file). A name a file already has is skipped: a job given the id and folder of a
    deleted one must not write over that job's logs (a delete never removes what is on disk). Blocking."""
    while True:
        path = log_dir / log_name(job_id, number)
        if not path_taken(path) and not path_taken(path.with_suffix(".exit.json")):
            return path
        number += 1


def exit_about(job: Job, run_dir: str | None) -> dict[str, Any]:
    """What a run's exit record says of it beyond its exit (`pg.write_exit_file`): whose run it was (the job's
    creation time: another job may take its id and folder) and swift's run folder."""
    return {"job_created_at": job.created_at, "run_dir": run_dir}


def unknown_runs(job: Job, log_dir: Path) -> list[Attempt]:
    """Runs of the job that its record does not know, from the exit records beside their logs in its folder: Redis
    came back from an older state (a snapshot, a restored backup) in which it waited, and a completed job ran
    again from its start (hunt BU). Only a record naming this job's creation time counts: a deleted job's, under
    the same id in the folder it reuses, is another job's, even one that ended after this job was created (its
    run stopping after Redis lost its record: review BV). As attempts of its own, which it then knows. Blocking."""
    known = {Path(a.log_file).name for a in job.attempts if a.log_file}
    found: list[Attempt] = []
    for path in sorted(log_dir.glob(f"{glob.escape(job.job_id)}.train*.log"), key=lambda p: (len(p.name), p.name)):
        if path.name in known or not _RUN_LOG.fullmatch(path.name[len(job.job_id) :]):
            continue
        record = pg.read_exit_record(path.with_suffix(".exit.json")) or {}
        (code, at), of = pg.exit_of(record), record.get("job_created_at")
        if not isinstance(of, (int, float)) or at is None or abs(of - job.created_at) > 1e-6:
            continue
        run_dir = record.get("run_dir")
        outcome = None if code is None else "completed" if code == 0 else "failed"
        found.append(Attempt(number=len(job.attempts) + len(found) + 1, run_id="unknown", started_at=at,
                             finished_at=at, outcome=outcome, error_code="unknown_run", log_file=str(path),
                             run_dir=run_dir if isinstance(run_dir, str) else None))  # fmt: skip
    return found


_RUN_LOG = re.compile(r"\.train(\.[0-9]+)?\.log")
