"""What the end of a run writes to its job (run_record.record_end)."""

from __future__ import annotations

from pathlib import Path

import pytest

from application.models.job_request import TrainingParams
from application.models.training_model import Job, JobStatus, Progress
from application.services.log_parser import RunFacts
from application.services.run_record import record_end, unrecorded_checkpoints


@pytest.mark.parametrize(("code", "interrupt", "status"), [
    (1, None, JobStatus.FAILED), (-15, "stop", JobStatus.STOPPED), (-15, "pause", JobStatus.PAUSED),
    (-15, "preempt", JobStatus.QUEUED), (0, None, JobStatus.COMPLETED),
])  # fmt: skip
def test_only_a_completed_run_keeps_swifts_estimate_of_the_time_left(code: int, interrupt: str | None,
                                                                     status: JobStatus) -> None:  # fmt: skip
    # A failed, stopped, paused or preempted job went on showing "33s" left of a run that was over.
    last = Progress(current_step=12, max_steps=40, remaining_time="33s", remaining_seconds=33.0, loss=0.5)
    job = Job(job_id="j", status=JobStatus.RUNNING, priority=5, owner=None, data_path="d", model_path="m",
              output_dir="/nowhere", output_dir_requested="j", num_gpus=1, training=TrainingParams(), created_at=0,
              updated_at=0, progress=last)  # fmt: skip
    for facts in (RunFacts(progress=last), RunFacts()):  # the run's own facts, or only what the job held
        end = record_end(job, code, facts, [], [], interrupt=interrupt, stop_outcome=None, override=None, now=1.0)
        assert end.status == status
        progress = end.fields.get("progress", job.progress)
        assert (progress.current_step, progress.loss) == (12, 0.5)
        kept = status == JobStatus.COMPLETED
        assert (progress.remaining_time == "33s", progress.remaining_seconds == 33.0) == (kept, kept)


def test_a_pause_names_the_checkpoint_the_next_run_resumes_from_not_one_cut_off(tmp_path: Path) -> None:
    # checkpoint-8 was cut before swift wrote its trainer_state.json: the next start skips it (first_resumable),
    # but the pause said "resumes from checkpoint-8" and counted 4 lost steps too few.
    done, cut = tmp_path / "checkpoint-4", tmp_path / "checkpoint-8"
    for folder in (done, cut):
        folder.mkdir()
    (done / "trainer_state.json").write_text("{}")
    job = Job(job_id="j", status=JobStatus.RUNNING, priority=5, owner=None, data_path="d", model_path="m",
              output_dir=str(tmp_path), output_dir_requested="j", num_gpus=1, training=TrainingParams(),
              created_at=0, updated_at=0)  # fmt: skip
    end = record_end(job, -15, RunFacts(progress=Progress(current_step=9, max_steps=20)), [], [str(done), str(cut)],
                     interrupt="pause", stop_outcome=None, override=None, now=1.0)  # fmt: skip
    assert end.status == JobStatus.PAUSED
    assert end.fields["resume_from"] == str(done)
    assert end.event is not None and end.event[2]["resume_step"] == 4 and end.event[2]["lost_steps"] == 5


def test_the_checkpoints_a_dead_runner_did_not_record_are_those_of_its_run_past_the_last_it_did() -> None:
    run, earlier = "/o/v1-b", "/o/v0-a"
    found = [f"{earlier}/checkpoint-5", f"{run}/checkpoint-10", f"{run}/checkpoint-15", f"{run}/checkpoint-20"]
    assert unrecorded_checkpoints(found, run, f"{run}/checkpoint-10") == found[2:]
    # It recorded none of this run (its last one is the earlier run's, the one it resumed from): all of this run's.
    assert unrecorded_checkpoints(found, run, f"{earlier}/checkpoint-5") == found[1:]
    assert unrecorded_checkpoints(found, run, None) == found[1:]
    assert unrecorded_checkpoints(found, None, None) == [] and unrecorded_checkpoints(found, run, found[-1]) == []


def test_what_a_run_was_asked_to_end_for_stays_once_seen_and_the_strongest_wins() -> None:
    from application.services.run_record import Asked

    asked = Asked()
    asked.take(False, False, "big-job")
    assert asked.interrupt == "preempt"
    asked.take(False, True, None)  # (a later read without the preemption keeps it)
    assert (asked.interrupt, asked.preempt_for) == ("pause", "big-job")
    asked.take(True, False, None)
    assert asked.interrupt == "stop"


def test_a_time_limit_outranks_any_request_and_a_host_going_down_requeues_the_run() -> None:
    from application.services.run_record import HOST_SHUTDOWN, Asked, run_ended_for

    paused = Asked(pause=True)
    interrupt, preempt_for, override = run_ended_for(paused, -15, timed_out=True, limit=90, told_to_end=False,
                                                     work="training")  # fmt: skip
    assert (interrupt, preempt_for) == (None, None) and override is not None
    assert override.status == JobStatus.FAILED and override.error_code == "time_limit"
    assert "time limit of 1 min 30 s (90 s)" in (override.error_message or ""), override
    # Done before its limit was noticed (exit 0): no override, the request stands.
    assert run_ended_for(paused, 0, timed_out=True, limit=90, told_to_end=False, work="training") == \
        ("pause", None, None)  # fmt: skip
    assert run_ended_for(Asked(), -15, timed_out=False, limit=None, told_to_end=True, work="training") == \
        ("preempt", HOST_SHUTDOWN, None)  # fmt: skip
    # A request of the user's is what ended it, not the host.
    assert run_ended_for(Asked(stop=True), -15, timed_out=False, limit=None, told_to_end=True, work="training") == \
        ("stop", None, None)  # fmt: skip


@pytest.mark.parametrize(("retries", "max_retries", "says"), [
    (2, 2, "(not retried: its 2 retries are used up)"), (1, 1, "(not retried: its retry is used up)"),
    (0, 0, None), (0, 2, "retry"),
])  # fmt: skip
def test_a_failure_that_ends_a_job_given_retries_says_why(retries: int, max_retries: int, says: str | None) -> None:
    # The last failure of a job whose retries ran out showed only its cause (hunt DK).
    job = Job(job_id="j", status=JobStatus.RUNNING, priority=5, owner=None, data_path="d", model_path="m",
              output_dir="/nowhere", output_dir_requested="j", num_gpus=1, training=TrainingParams(), created_at=0,
              updated_at=0, retries=retries, max_retries=max_retries)  # fmt: skip
    end = record_end(job, -9, RunFacts(), [], [], interrupt=None, stop_outcome=None, override=None, now=1.0)
    if says == "retry":
        assert end.status == JobStatus.QUEUED and "retry 1 of 2" in end.message
        return
    assert end.status == JobStatus.FAILED
    message = end.fields["error_message"]
    assert message.startswith("swift was killed by signal 9") and (
        message.endswith(says) if says else "(" not in message.partition(" (SIGKILL)")[2]
    ), message


def test_a_failure_whose_message_says_what_to_do_gets_no_retry_note() -> None:
    # A host that went down too often said "(not retried: an error the run printed would only repeat)" (review DL).
    from application.services.run_end import RunEnd

    job = Job(job_id="j", status=JobStatus.RUNNING, priority=5, owner=None, data_path="d", model_path="m",
              output_dir="/nowhere", output_dir_requested="j", num_gpus=1, training=TrainingParams(), created_at=0,
              updated_at=0, max_retries=2)  # fmt: skip
    for code in ("host_restarts", "disk_full"):
        gone = RunEnd(JobStatus.FAILED, "training failed: x", "x: free some space", code)
        end = record_end(job, None, RunFacts(), [], [], interrupt=None, stop_outcome=None, override=gone, now=1.0)
        assert end.fields["error_message"] == "x: free some space", end.fields
    printed = RunEnd(JobStatus.FAILED, "training failed: y", "ValueError: y", "exit_code")
    end = record_end(job, 1, RunFacts(), [], [], interrupt=None, stop_outcome=None, override=printed, now=1.0)
    assert end.fields["error_message"] == "ValueError: y (not retried: an error the run printed would only repeat)"


def test_a_retry_waits_longer_each_time_up_to_the_cap() -> None:
    # A fault of a minute (a node's, a file system's) used up every retry in seconds (hunt DK).
    from application.services.run_end import retry_wait
    from application.services.scheduler import RETRY_BACKOFF_CAP

    assert [retry_wait(30, n) for n in (1, 2, 3, 4, 5, 6, 10)] == [30, 60, 120, 240, 480, 600, 600]
    assert retry_wait(0, 3) == 0 and retry_wait(600, 1) == RETRY_BACKOFF_CAP
    job = Job(job_id="j", status=JobStatus.RUNNING, priority=5, owner=None, data_path="d", model_path="m",
              output_dir="/nowhere", output_dir_requested="j", num_gpus=1, training=TrainingParams(), created_at=0,
              updated_at=0, retries=2, max_retries=5)  # fmt: skip
    end = record_end(job, -9, RunFacts(), [], [], interrupt=None, stop_outcome=None, override=None, now=1000.0,
                     backoff=30)  # fmt: skip
    assert end.status == JobStatus.QUEUED and end.fields["retry_at"] == 1120.0, end.fields
    assert "retry 3 of 5: back in the queue, starts again in 2 min at the earliest" in end.message, end.message
    assert end.event is not None and end.event[2]["retry_at"] == 1120.0
    # Without a backoff it goes back at once, as before.
    end = record_end(job, -9, RunFacts(), [], [], interrupt=None, stop_outcome=None, override=None, now=1000.0)
    assert end.fields["retry_at"] is None and "back in the queue, resumes from" in end.message
