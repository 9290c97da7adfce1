"""How a run ends (run_end.final_status): a pure function of swift's exit status, whether it was asked to end,
and what its output says."""

from __future__ import annotations

import json
from pathlib import Path

from application.models.job_request import TrainingParams
from application.models.training_model import Job, JobStatus
from application.services.log_parser import RunFacts
from application.services.run_end import export_error, final_status, honoured_ask, runner_lost, work_of
from application.services.run_record import read_run, record_end

FIX = Path(__file__).parent / "fixtures" / "swift"

TRACEBACK = ["Traceback (most recent call last):", "FileNotFoundError: [Errno 2] No such file: '/d/train.jsonl'"]


def test_a_run_that_exited_0_is_completed_whatever_was_asked_meanwhile() -> None:
    finished = RunFacts(finished=True)
    assert final_status(0, False, RunFacts(), []).status == JobStatus.COMPLETED
    assert final_status(0, True, RunFacts(), []).status == JobStatus.COMPLETED
    # Nobody saw it exit: a log that reached its end says it completed, unless a stop was asked, since
    # ms-swift writes those last lines after a crash too (stopped can be resumed, completed cannot).
    assert final_status(None, False, finished, []).status == JobStatus.COMPLETED
    assert final_status(None, True, finished, []).status == JobStatus.STOPPED


def test_a_run_asked_to_end_is_stopped_and_any_other_end_has_failed_saying_why() -> None:
    assert final_status(-15, True, RunFacts(), []).status == JobStatus.STOPPED
    assert final_status(None, True, RunFacts(), []).status == JobStatus.STOPPED
    killed = final_status(-9, False, RunFacts(), [])
    assert killed.status == JobStatus.FAILED and killed.error_code == "signal"
    assert "killed by signal 9 (SIGKILL; often the kernel's OOM killer)" in (killed.error_message or "")
    failed = final_status(1, False, RunFacts(), TRACEBACK)
    assert failed.status == JobStatus.FAILED and failed.error_code == "exit_code"
    assert "FileNotFoundError" in (failed.error_message or "")
    unseen = final_status(None, False, RunFacts(), [])
    assert unseen.status == JobStatus.FAILED and unseen.error_code == "lost"


def test_a_run_or_export_that_failed_on_a_full_disk_says_so_first() -> None:
    # The full disk cut swift's log mid-line: the error was "swift exited with code 1:     (run_dir / "runs" /
    # name).w", and "No space left on device" was nowhere (hunt BW).
    cut = ["Traceback (most recent call last):", '    (run_dir / "runs" / name).w']
    full = final_status(1, False, RunFacts(), cut, disk_free=16 * 1024)
    assert full.status == JobStatus.FAILED and full.error_code == "disk_full"
    assert (full.error_message or "").startswith("the disk of the job's output folder is full (16 KiB free)")
    assert "free space on it (OUTPUT_ROOT), then resume the job if it saved a checkpoint" in (full.error_message or "")
    assert 'swift exited with code 1:     (run_dir / "runs" / name).w' in (full.error_message or "")
    # Room left, or not known: the log's own error, as before; a signal is the signal whatever the disk.
    assert final_status(1, False, RunFacts(), cut, disk_free=10 << 30).error_code == "exit_code"
    assert final_status(1, False, RunFacts(), cut).error_code == "exit_code"
    assert final_status(-9, False, RunFacts(), cut, disk_free=0).error_code == "signal"
    assert final_status(1, True, RunFacts(), cut, disk_free=0).status == JobStatus.STOPPED
    export = export_error(1, [], 3 << 20)
    assert export.startswith("the disk of the job's output folder is full (3.0 MiB free)") and "export again" in export
    assert export.endswith("swift export exited with code 1")
    assert export_error(1, [], 1 << 40) == "swift export exited with code 1"
    assert export_error(-9, [], 0).startswith("swift export was killed by signal 9")


def test_a_multi_gpu_runs_failure_names_the_ranks_error_and_a_killed_rank_is_retryable(tmp_path: Path) -> None:
    # torchrun exits 1 whatever ended the rank that failed first, and prints ~7 lines per rank and its own
    # traceback after the trainer's: the error read "swift exited with code 1: ======", and a rank the OOM killer
    # took was not retried (a single process killed so is).
    job = Job(job_id="j", status=JobStatus.RUNNING, priority=5, owner=None, data_path="d", model_path="m",
              output_dir=str(tmp_path), output_dir_requested="j", num_gpus=8, training=TrainingParams(),
              created_at=0, updated_at=0, max_retries=1)  # fmt: skip
    raised = FIX / "torchrun_8ranks_one_raises.log"
    facts, tail, checkpoints, _ = read_run(job, raised, RunFacts(), 50)
    end = record_end(job, 1, facts, tail, checkpoints, interrupt=None, stop_outcome=None, override=None, now=1.0,
                     keep=50)  # fmt: skip
    assert end.status == JobStatus.FAILED and end.fields["error_message"].startswith("RuntimeError: NCCL error in")
    assert len(end.fields["log_tail"]) == 50
    killed = FIX / "torchrun_2ranks_one_sigkilled.log"
    facts, tail, checkpoints, _ = read_run(job, killed, RunFacts(), 50)
    end = record_end(job, 1, facts, tail, checkpoints, interrupt=None, stop_outcome=None, override=None, now=1.0)
    assert end.status == JobStatus.QUEUED and end.fields["retries"] == 1, end  # retried, as a single process is
    assert "rank 0" in end.message and "signal 9" in end.message, end.message


def test_a_huge_last_log_line_is_stored_clipped_in_the_error_and_the_tail(tmp_path: Path) -> None:
    # A trainer printed a 10 MB line, then a 3 MB one: the job page was 20 MB, and each list page holding it 3 MB.
    job = Job(job_id="j", status=JobStatus.RUNNING, priority=5, owner=None, data_path="d", model_path="m",
              output_dir=str(tmp_path), output_dir_requested="j", num_gpus=1, training=TrainingParams(),
              created_at=0, updated_at=0)  # fmt: skip
    log = tmp_path / "j.train.log"
    log.write_text("Train:  50%|#####| 1/2\n" + "x" * 10_000_000 + "\nwords " + "y" * 3_000_000 + "\n")
    facts, tail, checkpoints, _ = read_run(job, log, RunFacts(), 20)
    end = record_end(job, 1, facts, tail, checkpoints, interrupt=None, stop_outcome=None, override=None, now=1.0,
                     keep=20)  # fmt: skip
    error = end.fields["error_message"]
    assert end.status == JobStatus.FAILED and error.startswith("swift exited with code 1: words yyy"), error[:80]
    assert len(error) < 5000 and "more characters" in error
    assert sum(map(len, end.fields["log_tail"])) < 10_000 and end.fields["log_tail"][0].startswith("Train:")


def test_a_checkpoint_logging_jsonl_names_out_of_the_job_folder_is_not_the_jobs(tmp_path: Path) -> None:
    # The log parser refused such a path from the log; the same path written into logging.jsonl was stored.
    out = tmp_path / "out" / "j"
    run = out / "v0-20261203-000000"
    (run / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "elsewhere" / "checkpoint-2").mkdir(parents=True)
    job = Job(job_id="j", status=JobStatus.RUNNING, priority=5, owner=None, data_path="d", model_path="m",
              output_dir=str(out), output_dir_requested="j", num_gpus=1, training=TrainingParams(),
              created_at=0, updated_at=0)  # fmt: skip
    for best in (tmp_path / "elsewhere" / "checkpoint-2", run / "checkpoint-2"):
        summary = {"last_model_checkpoint": str(tmp_path / "elsewhere" / "checkpoint-2"),
                   "best_model_checkpoint": str(best), "train_loss": 1.0}  # fmt: skip
        (run / "logging.jsonl").write_text(json.dumps(summary) + "\n")
        facts, tail, checkpoints, _ = read_run(job, None, RunFacts(run_dir=str(run)), 20)
        assert facts.last_checkpoint is None and facts.finished
        assert facts.best_checkpoint == (str(best) if best.is_relative_to(out) else None)
        end = record_end(job, 0, facts, tail, checkpoints, interrupt=None, stop_outcome=None, override=None, now=1.0)
        assert end.fields["last_checkpoint"] == str(run / "checkpoint-2")


def test_a_runners_own_exit_code_is_not_read_as_a_signal() -> None:
    # The scheduler reads a runner's status from Popen, where a signal is negative: 247 is the runner's own exit
    # code, not swift's "256 - 9" (that reading is for swift's launchers), and was reported as a SIGKILL.
    assert (runner_lost(-9, 4321).error_message or "").startswith("runner killed by signal 9 (SIGKILL")
    for code in (247, 137):
        own = runner_lost(code, 4321).error_message or ""
        assert own.startswith(f"runner exited with code {code} before recording the end of the run"), own


def test_an_export_jobs_end_is_worded_as_an_exports() -> None:
    export = Job(job_id="q-quant", status=JobStatus.RUNNING, priority=5, owner=None, data_path="d", model_path="m",
                 output_dir="/o", output_dir_requested="o", num_gpus=1, kind="export", export_of="q",
                 training=TrainingParams(), created_at=0, updated_at=0)  # fmt: skip
    failed = final_status(1, False, RunFacts(), TRACEBACK, work_of(export))
    assert failed.message.startswith("export failed: FileNotFoundError"), failed.message
    assert runner_lost(-9, 4321, work="export").message.startswith("export failed: runner killed by signal 9")
    assert final_status(0, False, RunFacts(), [], work_of(export.model_copy(update={"kind": "sft"}))).message == \
        "training completed"  # fmt: skip


def test_a_stop_or_pause_asked_as_a_run_ended_queued_is_honoured_the_stop_first() -> None:
    # The scheduler's pass and the pause's and stop's own answers all rest such a job by this one rule.
    queued = Job(job_id="j", status=JobStatus.QUEUED, priority=5, owner=None, data_path="d", model_path="m",
                 output_dir="/o", output_dir_requested="o", num_gpus=1, training=TrainingParams(), created_at=0,
                 updated_at=0, retry_at=50.0, resume_from="/o/v0/checkpoint-10")  # fmt: skip
    assert honoured_ask(queued, checkpoint=True) is None
    paused = honoured_ask(queued.model_copy(update={"pause_requested": True}), checkpoint=True)
    assert paused is not None and paused.status == JobStatus.PAUSED
    assert paused.fields == {"pause_requested": False, "retry_at": None}
    assert paused.unchanged == {"pause_requested": "true"}  # (a resume since cleared it: not paused again)
    assert paused.message.endswith("resumes from /o/v0/checkpoint-10")
    both = queued.model_copy(update={"pause_requested": True, "stop_requested": True})
    assert (honoured_ask(both, checkpoint=True) or paused).status == JobStatus.STOPPED
    assert (honoured_ask(both, checkpoint=False) or paused).status == JobStatus.CANCELLED
