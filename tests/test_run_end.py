"""How a run ends (run_end.final_status): a pure function of swift's exit status, whether it was asked to end,
and what its output says."""

from __future__ import annotations

from application.models.training_model import JobStatus
from application.services.log_parser import RunFacts
from application.services.run_end import final_status

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
