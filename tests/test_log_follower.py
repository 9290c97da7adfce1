"""A runner's log follower over the output of a real ms-swift 4.6.0 run (tests/fixtures/swift), read as it grows."""

from __future__ import annotations

import time
from pathlib import Path

import redis.asyncio as aioredis

from application.services.job_store import JobStore
from application.services.keys import Keys
from application.services.log_follower import LogFollower
from application.services.log_parser import SwiftLogParser
from application.services.outbox import Outbox

FIX = Path(__file__).parent / "fixtures" / "swift"
RUN = "/data/lab/out/v0-20261126-155015"


def follower(log: Path, started_at: float, limit: int | None = None,
             checkpoints: list[str] | None = None) -> tuple[LogFollower, Outbox]:  # fmt: skip
    # Never flushed, so never connected: what the follower queued stays in the outbox to be looked at.
    outbox = Outbox(JobStore(aioredis.Redis(), Keys("t")), "job", "run")
    return LogFollower(log, SwiftLogParser(root="/data/lab/out"), outbox, started_at, limit, checkpoints or []), outbox


def real_log() -> bytes:
    return (FIX / "sft_success.stderr.txt").read_bytes() + (FIX / "sft_success.stdout.txt").read_bytes()


def test_a_log_read_as_it_grows_queues_every_step_and_checkpoint_once(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    log.write_bytes(b"")
    follow, outbox = follower(log, time.time())
    data = real_log()
    for i in range(0, len(data), 977):  # lines cut anywhere
        with log.open("ab") as f:
            f.write(data[i : i + 977])
        assert follow.read() is False
    follow.flush()
    assert follow.offset == len(data)
    whole = SwiftLogParser(root="/data/lab/out")
    expected = whole.feed(data).history + whole.flush().history
    assert len(expected) == 13  # 11 training steps logged, 2 evaluations
    assert [(p["step"], p.get("loss"), p.get("eval_loss")) for p in outbox.history] == [
        (p["step"], p.get("loss"), p.get("eval_loss")) for p in expected
    ]
    assert outbox.fields["progress"].current_step == 20
    assert outbox.fields["last_checkpoint"] == f"{RUN}/checkpoint-20"
    assert outbox.fields["run_dir"] == RUN
    saved = [e["message"] for e in outbox.events if e["type"] == "checkpoint_saved"]
    assert saved == [f"checkpoint saved: {RUN}/checkpoint-10", f"checkpoint saved: {RUN}/checkpoint-20"]


def test_a_read_budget_leaves_the_rest_for_the_next_pass(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    data = real_log()
    log.write_bytes(data)
    follow, outbox = follower(log, time.time())
    passes = 1
    while follow.read(budget=1000):  # True: more is waiting
        assert follow.offset == 1000 * passes
        passes += 1
    assert passes == -(-len(data) // 1000) and follow.offset == len(data)
    assert outbox.fields["progress"].current_step == 20


def test_swifts_remaining_time_predicts_the_run_but_never_past_its_time_limit(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    first_step = (FIX / "sft_success.stdout.txt").read_text().splitlines()[1]
    assert "'remaining_time': '2s'" in first_step
    log.write_text(first_step + "\n")
    follow, outbox = follower(log, time.time() - 100)
    follow.read()
    assert outbox.fields["predicted_duration"].source == "progress"
    assert 101 <= outbox.fields["predicted_duration"].seconds < 110  # 100 s gone, 2 s to go
    follow, outbox = follower(log, time.time() - 100, limit=60)
    follow.read()
    assert outbox.fields["predicted_duration"].seconds == 60


def test_a_loss_that_turns_nan_is_told_once_with_its_step(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    steps = [line for line in (FIX / "sft_success.stdout.txt").read_text().splitlines() if line.startswith("{'loss'")]
    # swift 4.x prints every figure as a string: a diverged run's as 'nan' (3.x: bare nan, inf).
    diverged = [steps[0], steps[1].replace("'loss': '8.28'", "'loss': 'nan'"),
                steps[2].replace("'loss': '8.258'", "'loss': inf")]  # fmt: skip
    assert diverged[1] != steps[1] and diverged[2] != steps[2]
    log.write_text("\n".join(diverged) + "\n")
    follow, outbox = follower(log, time.time())
    follow.read()
    told = [e for e in outbox.events if e["type"] == "loss_not_finite"]
    assert len(told) == 1 and "at step 2: the run diverged" in told[0]["message"], told
    assert [p.get("loss") for p in outbox.history] == [8.264, None, None]


def test_a_running_jobs_checkpoints_grow_with_each_one_saved_less_those_removed(tmp_path: Path) -> None:
    # Only the run's end wrote the list: a running job showed `checkpoints: []` beside its last_checkpoint, and
    # after a resume the earlier run's alone (hunt EO). Those save_total_limit removes go (review EQ).
    out = tmp_path / "out"
    run = out / "v0-20261126-155015"
    data = real_log().replace(b"/data/lab/out", str(out).encode())
    cut = data.index(b"checkpoint-20")
    earlier = out / "v0-20261126-140000" / "checkpoint-5"
    for folder in (earlier, run / "checkpoint-10"):
        folder.mkdir(parents=True)
    outbox = Outbox(JobStore(aioredis.Redis(), Keys("t")), "job", "run")
    log = tmp_path / "train.log"
    follow = LogFollower(log, SwiftLogParser(root=str(out)), outbox, time.time(), None, [str(earlier)])
    log.write_bytes(data[:cut])
    follow.read()
    assert outbox.fields["checkpoints"] == [str(earlier), f"{run}/checkpoint-10"]
    assert outbox.fields["last_checkpoint"] == f"{run}/checkpoint-10"
    (run / "checkpoint-20").mkdir()
    log.write_bytes(data[: data.index(b"\n", cut) + 1])
    follow.read()
    assert outbox.fields["checkpoints"] == [str(earlier), f"{run}/checkpoint-10", f"{run}/checkpoint-20"]
    # swift removes the oldest just after it says it saved the newest: the next read leaves it out.
    earlier.rmdir()
    (run / "checkpoint-10").rmdir()
    log.write_bytes(data)
    follow.read()
    follow.flush()
    assert outbox.fields["checkpoints"] == [f"{run}/checkpoint-20"]


def test_a_checkpoint_removed_after_lines_printed_while_the_save_was_written_is_left_out(tmp_path: Path) -> None:
    # The one look after a save went to the next read that brought anything: a save that prints while it writes
    # (DeepSpeed's "zero checkpoint saved") left a removed folder listed until the next save (review EU).
    out = tmp_path / "out"
    run = out / "v0-20261207-100000"
    for n in (10, 20, 30):
        (run / f"checkpoint-{n}").mkdir(parents=True)
    outbox = Outbox(JobStore(aioredis.Redis(), Keys("t")), "job", "run")
    log = tmp_path / "train.log"
    follow = LogFollower(log, SwiftLogParser(root=str(out)), outbox, time.time())
    lines = [f"[INFO:swift] Saving model checkpoint to {run}/checkpoint-{n}\n" for n in (10, 20, 30)]
    lines.append("[2026-12-07 10:00:01,000] [INFO] [engine.py:3536:_save_zero_checkpoint] zero checkpoint saved\n")
    for upto in (2, 3, 4):
        log.write_text("".join(lines[:upto]))
        follow.read()
    (run / "checkpoint-10").rmdir()  # save_total_limit 2: swift removes it once the save is written
    lines.append("{'loss': 1.2, 'grad_norm': 1.0, 'learning_rate': 1e-05, 'epoch': 1.0, "
                 "'global_step/max_steps': '31/100'}\n")  # fmt: skip
    log.write_text("".join(lines))
    follow.read()
    assert outbox.fields["checkpoints"] == [f"{run}/checkpoint-20", f"{run}/checkpoint-30"]
