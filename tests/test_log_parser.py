"""The parser against output captured from real ms-swift 4.6.0 and 3.5.3 runs (tests/fixtures/swift)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from application.models.training_model import LossPoint
from application.services.log_parser import ParseResult, SwiftLogParser
from application.services.run_outputs import find_checkpoints, parse_logging_jsonl
from application.services.step_dicts import parse_step_dict

FIX4 = Path(__file__).parent / "fixtures" / "swift"
FIX3 = FIX4 / "ms-swift-3.5.3"
RUN4 = "/data/lab/out/v0-20261126-155015"
RUN4_NOEVAL = "/data/lab/outA/v0-20261126-155041"
RUN3 = "/data/lab/out35/v0-20261126-154737"


class Collected:
    """Everything the ParseResults of a whole log said, merged."""

    def __init__(self) -> None:
        self.results: list[ParseResult] = []
        self.history: list[dict[str, object]] = []
        self.checkpoints_saved: list[str] = []

    def add(self, result: ParseResult) -> None:
        self.results.append(result)
        self.history.extend(result.history)
        self.checkpoints_saved.extend(result.checkpoints_saved)


def feed(data: bytes, chunk_sizes: list[int] | None = None, seed: int = 0) -> tuple[SwiftLogParser, Collected]:
    parser = SwiftLogParser()
    got = Collected()
    if chunk_sizes is None:
        got.add(parser.feed(data))
    else:
        rng = random.Random(seed)
        pos = 0
        while pos < len(data):
            size = rng.choice(chunk_sizes)
            got.add(parser.feed(data[pos : pos + size]))
            pos += size
    got.add(parser.flush())
    return parser, got


def read(*paths: Path) -> bytes:
    return b"".join(p.read_bytes() for p in paths)


def comparable(history: list[dict[str, object]]) -> list[dict[str, object]]:
    return [{k: v for k, v in point.items() if k != "time"} for point in history]


# ---------------------------------------------------------------------------------------------
# Whole runs


def test_4x_success_run() -> None:
    parser, got = feed(read(FIX4 / "sft_success.stdout.txt", FIX4 / "sft_success.stderr.txt"))
    assert parser.run_dir == RUN4
    assert parser.command_line is not None
    assert parser.command_line.startswith(
        "/opt/venv/bin/python3 /opt/venv/lib/python3.11/site-packages/swift/cli/sft.py"
    )
    assert "--tuner_type lora" in parser.command_line
    assert parser.checkpoints == [f"{RUN4}/checkpoint-10", f"{RUN4}/checkpoint-20"]
    assert got.checkpoints_saved == parser.checkpoints
    assert parser.last_checkpoint == f"{RUN4}/checkpoint-20"
    assert parser.best_checkpoint == f"{RUN4}/checkpoint-20"
    assert parser.training_ended
    assert parser.train_loss == 8.261
    assert parser.train_runtime == 1.608
    assert parser.merged_path is None

    p = parser.progress
    assert p is not None
    assert (p.current_step, p.max_steps, p.percentage) == (20, 20, 100.0)
    assert p.epoch == 0.5
    assert p.loss == 8.278
    assert p.eval_loss == 8.256
    assert p.learning_rate == 0.0
    assert p.grad_norm == 0.7005
    assert p.token_acc == 0.0
    assert p.remaining_seconds == 0.0
    assert p.memory_gib is None
    assert p.updated_at is not None

    steps = [(pt["step"], pt["loss"] is not None, pt["eval_loss"] is not None) for pt in got.history]
    train_steps = [s for s, is_train, _ in steps if is_train]
    eval_steps = [s for s, _, is_eval in steps if is_eval]
    assert train_steps == [1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert eval_steps == [10, 20]
    assert got.history[0] == {
        "step": 1,
        "loss": 8.264,
        "eval_loss": None,
        "learning_rate": 9.938e-05,
        "grad_norm": 0.6385,
        "epoch": 0.025,
        "time": got.history[0]["time"],
        "metrics": {"token_acc": 0.0},
    }
    assert next(pt for pt in got.history if pt["eval_loss"] is not None)["eval_loss"] == 8.26
    for point in got.history:
        LossPoint.model_validate(point)
    assert len(got.history) == 13


def test_the_sample_swift_echoes_from_the_data_is_not_read_as_training_output() -> None:
    # swift prints the first sample whole ([INPUT], [LABELS]: the user's text, line by line): a data set that held
    # step dicts, bars or checkpoint lines (a model taught to read logs) set the progress, a loss point at step
    # 900, a diverged loss "at step 900" and a checkpoint that never was.
    echoed = (
        "{'loss': 'nan', 'grad_norm': '1', 'learning_rate': '1e-05', 'epoch': '3', 'global_step/max_steps': "
        "'900/1000', 'elapsed_time': '5h 0m 0s', 'remaining_time': '30m 0s', 'train_speed(s/it)': '20'}\n"
        "Train: 100%|##########| 5000/5000 [1:00:00<00:00,  1.39it/s]\n"
        f"    Saving model checkpoint to {RUN4}/checkpoint-999\n"
    ).encode()
    clean = read(FIX4 / "sft_success.stdout.txt", FIX4 / "sft_success.stderr.txt")
    hostile = clean
    for tag in (b"[INFO:swift] [INPUT] <|im_start|>system\n", b"[INFO:swift] [LABELS] [-100 * 51]"):
        assert tag in hostile
        hostile = hostile.replace(tag, tag + echoed if tag.endswith(b"\n") else tag + b"x\n" + echoed)
    stderr = hostile[len((FIX4 / "sft_success.stdout.txt").read_bytes()) :]  # (stdout: the step dicts)
    before = stderr[: stderr.index(b"Dataset Token Length")]
    parser, _ = feed(before)
    assert parser.progress is None and parser.checkpoints == []
    expected, want = feed(clean)
    parser, got = feed(hostile)
    assert comparable(got.history) == comparable(want.history)
    assert parser.checkpoints == expected.checkpoints and got.checkpoints_saved == want.checkpoints_saved
    assert parser.progress is not None and expected.progress is not None
    assert parser.progress.current_step == expected.progress.current_step == 20


def test_4x_success_stdout_only_progress_as_it_goes() -> None:
    lines = (FIX4 / "sft_success.stdout.txt").read_bytes().split(b"\n")
    parser = SwiftLogParser()
    parser.feed(b"\n".join(lines[:3]) + b"\n")
    p = parser.progress
    assert p is not None
    assert (p.current_step, p.max_steps, p.percentage) == (2, 20, 10.0)
    assert p.train_speed == 0.06786
    assert p.elapsed_time == "0s"
    assert p.remaining_time == "1s"
    assert p.remaining_seconds == 1.0
    assert p.eval_loss is None
    # The summary dict moves progress but is no history point.
    result = parser.feed(b"\n".join(lines[3:]))
    assert result.train_loss == 8.261 and result.train_runtime == 1.608
    at_20 = [(pt["loss"], pt["eval_loss"]) for pt in result.history if pt["step"] == 20]
    assert at_20 and all(loss == 8.278 or eval_loss == 8.256 for loss, eval_loss in at_20), at_20
    assert len(result.history) == 11
    # The eval dict sets eval_loss but leaves the last training loss alone.
    assert parser.progress is not None and parser.progress.loss == 8.278


@pytest.mark.parametrize("seed", range(5))
def test_chunking_does_not_matter(seed: int) -> None:
    data = read(FIX4 / "sft_success.stderr.txt", FIX4 / "sft_success.stdout.txt")
    whole, whole_got = feed(data)
    parts, parts_got = feed(data, chunk_sizes=[1, 2, 3, 7, 64, 500, 4096], seed=seed)
    assert comparable(parts_got.history) == comparable(whole_got.history)
    assert parts_got.checkpoints_saved == whole_got.checkpoints_saved
    for attr in ("run_dir", "command_line", "last_checkpoint", "best_checkpoint", "train_loss", "train_runtime"):
        assert getattr(parts, attr) == getattr(whole, attr)
    assert parts.progress is not None and whole.progress is not None
    assert parts.progress.model_dump(exclude={"updated_at"}) == whole.progress.model_dump(exclude={"updated_at"})


def test_dicts_interleaved_with_tqdm_bars() -> None:
    # One log file for both streams: tqdm.write clears the bar on stderr, the dict goes to stdout,
    # the bar is redrawn, and nothing but \r separates them.
    bar = "Train:  10%|█         | 2/20 [00:00<00:01,  9.66it/s]"
    data = (
        f"\r{bar}\r{' ' * len(bar)}\r"
        "{'loss': '8.28', 'grad_norm': '0.6729', 'learning_rate': '9.755e-05', 'token_acc': '0', "
        "'epoch': '0.05', 'global_step/max_steps': '2/20', 'elapsed_time': '0s', 'remaining_time': '1s', "
        "'train_speed(s/it)': '0.06786'}\n"
        f"\r{bar}\rTrain:  15%|█▌        | 3/20 [00:00<00:01,  9.66it/s]"
        "[INFO:swift] Saving model checkpoint to /x/v0-1/checkpoint-3\n"
    ).encode()
    parser, got = feed(data, chunk_sizes=[1, 5, 13], seed=1)
    assert [pt["step"] for pt in got.history] == [2]
    assert got.checkpoints_saved == ["/x/v0-1/checkpoint-3"]
    assert parser.progress is not None and parser.progress.loss == 8.28
    # The bar's step 3 is 0.075 epochs on from 0.05 at step 2: the epoch was step 2's until the next step dict.
    assert (parser.progress.current_step, parser.progress.epoch) == (3, 0.075)


@pytest.mark.parametrize(("per_epoch", "step", "epoch"), [(40, 2, 0.05), (1000, 1, 0.001)])
def test_the_epoch_between_logged_steps_goes_with_the_bar_without_drifting(per_epoch: int, step: int,
                                                                           epoch: float) -> None:  # fmt: skip
    # Scaled bar after bar from the last bar's rounded epoch, it drifted to 1.19 at the end of an epoch, or stuck at
    # 0 for good (review DL).
    parser = SwiftLogParser()
    parser.feed((f"{{'loss': '1.0', 'epoch': '{epoch}', 'global_step/max_steps': '{step}/{2 * per_epoch}'}}\n"
                 ).encode())  # fmt: skip
    for n in range(step + 1, per_epoch + 1):
        parser.feed(f"\rTrain:  1%|#| {n}/{2 * per_epoch} [00:01<00:10,  9.00it/s]\n".encode())
        if n == per_epoch // 2:
            assert parser.progress is not None and parser.progress.epoch == pytest.approx(0.5, abs=1e-4)
    assert parser.progress is not None and parser.progress.epoch == pytest.approx(1.0, abs=1e-4)


def test_tqdm_train_bar_moves_progress_between_logged_steps() -> None:
    parser, _ = feed((FIX4 / "sigterm_to_launcher_only.stderr_tail.txt").read_bytes())
    p = parser.progress
    assert p is not None
    assert (p.current_step, p.max_steps, p.percentage) == (1158, 3000, 38.6)
    assert (p.elapsed_time, p.remaining_time) == ("25s", "38s")  # tqdm's clock, in swift's style like all times
    assert p.remaining_seconds == 38.0
    assert p.train_speed == pytest.approx(1 / 48.26)
    assert p.loss is None
    # Redraws of an older bar do not move progress back.
    result = parser.feed(b"\rTrain:  38%|###| 1150/3000 [00:25<00:38, 47.81it/s]\n")
    assert result.progress is None
    slow = parser.feed(b"\rTrain:  39%|###| 1159/3000 [00:26<10:00,  2.50s/it]\n")
    assert slow.progress is not None and slow.progress.train_speed == 2.5
    # The Val bar is not training progress.
    assert parser.feed(b"\rVal:  50%|#####| 5/10 [00:00<00:00, 64.0it/s]\n").progress is None


def test_4x_default_no_eval_run() -> None:
    parser, got = feed(
        read(FIX4 / "sft_default_checkmodel_noeval.stdout.txt", FIX4 / "sft_default_checkmodel_noeval.stderr.txt")
    )
    assert parser.run_dir == RUN4_NOEVAL
    assert parser.checkpoints == [f"{RUN4_NOEVAL}/checkpoint-10", f"{RUN4_NOEVAL}/checkpoint-20"]
    assert parser.last_checkpoint == f"{RUN4_NOEVAL}/checkpoint-20"
    assert parser.best_checkpoint is None  # printed as 'None'
    assert parser.train_loss == 8.274
    assert parser.train_runtime == 0.728
    assert all(pt["eval_loss"] is None for pt in got.history)
    assert [pt["step"] for pt in got.history] == [1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert parser.progress is not None and parser.progress.eval_loss is None


def test_3x_success_run() -> None:
    data = read(FIX3 / "sft_success.stdout.txt", FIX3 / "sft_success.stderr.txt")
    first = SwiftLogParser()
    first_line = data.split(b"\n")[1] + b"\n"
    first.feed(data.split(b"\n")[0] + b"\n" + first_line)
    p1 = first.progress
    assert p1 is not None
    assert (p1.current_step, p1.max_steps, p1.percentage) == (1, 20, 5.0)
    assert p1.memory_gib == 0.0
    assert p1.train_speed == pytest.approx(1 / 2.075509)  # 3.x prints iterations per second
    assert p1.loss == 8.27054501

    parser, got = feed(data, chunk_sizes=[3, 100, 999], seed=3)
    assert parser.run_dir == RUN3
    assert parser.command_line is not None and "--train_type lora" in parser.command_line
    assert parser.checkpoints == [f"{RUN3}/checkpoint-10", f"{RUN3}/checkpoint-20"]
    assert parser.last_checkpoint == parser.best_checkpoint == f"{RUN3}/checkpoint-20"
    assert parser.train_loss == 8.26525202
    assert parser.train_runtime == 1.7624
    p = parser.progress
    assert p is not None
    assert (p.current_step, p.percentage, p.eval_loss, p.loss) == (20, 100.0, 8.25973511, 8.2359314)
    assert len(got.history) == 13
    assert [pt["step"] for pt in got.history if pt["eval_loss"] is not None] == [10, 20]


def test_a_long_run_does_not_grow_its_parser_and_two_ranks_steps_still_count_once() -> None:
    # Every step's key was kept to drop another rank's copy: 130 B per step, for ever (a runner grew 5 MB over
    # 25k steps: hunt AN).
    import tracemalloc

    parser = SwiftLogParser()
    line = "{'loss': '1.5', 'learning_rate': '1e-05', 'epoch': '0.1', 'global_step/max_steps': '%d/100000'}\n"
    tracemalloc.start()
    try:
        for step in range(1, 2001):
            parser.feed((line % step).encode())
        before = tracemalloc.get_traced_memory()[0]
        for step in range(2001, 22001):
            got = parser.feed((line % step).encode() * 2)  # (both ranks print it)
            assert len(got.history) == 1
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 1_000_000, grown  # (2.6 MB for these 20,000 steps before)


def test_cpu_two_process_run_dedupes_steps() -> None:
    parser, got = feed((FIX4 / "sft_nproc2_cpu.stdout.txt").read_bytes())
    assert [pt["step"] for pt in got.history] == [1, 2, 3, 4]
    assert got.history[0]["loss"] == 8.273  # the first rank's, duplicates dropped
    assert parser.command_line is not None and "torch.distributed.run --nproc_per_node 2" in parser.command_line
    assert parser.progress is not None and parser.progress.current_step == 4
    assert parser.train_loss is not None


@pytest.mark.parametrize(
    ("fix", "merged"),
    [
        (FIX4, f"{RUN4}/checkpoint-20-merged"),
        (FIX3, f"{RUN3}/checkpoint-20-merged"),  # 3.x: no backticks, a trailing '.'
    ],
)
def test_export_merge(fix: Path, merged: str) -> None:
    parser, got = feed(read(fix / "export_merge.stdout.txt", fix / "export_merge.stderr.txt"))
    assert parser.merged_path == merged
    assert any(r.merged_path == merged for r in got.results)
    assert parser.command_line is not None and "/swift/cli/export.py --adapters" in parser.command_line
    assert parser.run_dir is None  # export prints `args.output_dir:`, not a run dir
    assert parser.progress is None
    assert got.history == []


@pytest.mark.parametrize(
    ("fix", "name", "run_dir"),
    [
        (FIX4, "fail_unknown_arg", "/data/lab/out_fail_arg/v0-20261126-155142"),
        (FIX3, "fail_tuner_type", "/data/lab/out35_fail_tuner_type/v0-20261126-154834"),
        (FIX4, "fail_model", None),
        (FIX3, "fail_model", None),
        (FIX4, "fail_dataset", None),  # its tail starts after the output_dir line
        (FIX4, "fail_hubid", None),
        (FIX4, "fail_no_model_type", None),
        (FIX4, "fail_no_template", None),
        (FIX3, "fail_dataset", None),
    ],
)
def test_failed_runs(fix: Path, name: str, run_dir: str | None) -> None:
    parser, got = feed(read(fix / f"{name}.stdout.txt", fix / f"{name}.stderr_tail.txt"))
    assert parser.command_line is not None and parser.command_line.endswith(
        (fix / f"{name}.stdout.txt").read_text().split("`")[1].split(" ")[-1]
    )
    assert parser.run_dir == run_dir
    assert parser.progress is None
    assert got.history == [] and parser.checkpoints == []
    assert not parser.training_ended


def test_sigint_tail_end_of_training_lines_after_a_bar() -> None:
    parser, _ = feed((FIX4 / "sigint_to_process_group.stderr_tail.txt").read_bytes())
    assert parser.training_ended
    assert parser.last_checkpoint is None and parser.best_checkpoint is None
    assert parser.progress is not None and parser.progress.current_step == 9


def test_non_utf8_and_garbage_do_not_break_parsing() -> None:
    data = (
        b"\xff\xfe\x00garbage\n"
        b"{'loss': '1.5', 'global_step/max_steps': '1/4', 'epoch': '\xff'}\n"
        b"{'loss': '1.25', 'global_step/max_steps': '2/4'}\n"
        + b"x" * 3_000_000  # a 3 MB segment with no separator is dropped, not held
        + b"\n{'loss': '1.0', 'global_step/max_steps': '3/4'}\n"
    )
    parser, got = feed(data, chunk_sizes=[65536], seed=0)
    assert [pt["step"] for pt in got.history] == [1, 2, 3]
    assert got.history[0]["epoch"] is None
    assert parser.progress is not None and parser.progress.current_step == 3


def test_parse_result_changed_flag() -> None:
    parser = SwiftLogParser()
    assert not parser.feed(b"[INFO:swift] nothing here\n").changed()
    assert parser.feed(b"[INFO:swift] output_dir: /o/v0-1\n").changed()
    assert not parser.feed(b"{'loss': '1.0', 'global_step/max_steps'").changed()  # waits for the rest
    assert parser.feed(b": '1/2'}\n").changed()


# ---------------------------------------------------------------------------------------------
# logging.jsonl


@pytest.mark.parametrize(
    ("path", "points", "last", "best", "train_loss", "runtime"),
    [
        (FIX4 / "sft_success.logging.jsonl", 13, f"{RUN4}/checkpoint-20", f"{RUN4}/checkpoint-20", 8.26144772, 1.6079),
        (
            FIX4 / "sft_default_checkmodel_noeval.logging.jsonl",
            11,
            f"{RUN4_NOEVAL}/checkpoint-20",
            None,
            8.27446303,
            0.728,
        ),
        (FIX3 / "sft_success.logging.jsonl", 13, f"{RUN3}/checkpoint-20", f"{RUN3}/checkpoint-20", 8.26525202, 1.7624),
    ],
)
def test_parse_logging_jsonl(
    path: Path, points: int, last: str, best: str | None, train_loss: float, runtime: float
) -> None:
    log = parse_logging_jsonl(path)
    assert log.finished
    assert len(log.history) == points
    assert log.last_checkpoint == last
    assert log.best_checkpoint == best
    assert log.train_loss == train_loss
    assert log.train_runtime == runtime
    assert log.progress is not None and log.progress.current_step == 20 and log.progress.percentage == 100.0
    assert all(pt["time"] is None for pt in log.history)
    for point in log.history:
        LossPoint.model_validate(point)


def test_parse_logging_jsonl_while_running_and_missing(tmp_path: Path) -> None:
    lines = (FIX4 / "sft_success.logging.jsonl").read_text().split("\n")
    partial = tmp_path / "logging.jsonl"
    partial.write_text("\n".join(lines[:5]) + "\n" + lines[5][:40])  # the 6th line half written
    log = parse_logging_jsonl(partial)
    assert not log.finished
    assert [pt["step"] for pt in log.history] == [1, 2, 4, 6, 8]
    assert log.last_checkpoint is None and log.train_loss is None
    assert log.progress is not None and log.progress.current_step == 8 and log.progress.percentage == 40.0
    assert log.progress.train_speed == 0.036505
    empty = parse_logging_jsonl(tmp_path / "missing.jsonl")
    assert empty.history == [] and empty.progress is None and not empty.finished
    junk = tmp_path / "junk.jsonl"
    junk.write_text('[1, 2]\nnot json\n{"loss": 1.0, "global_step/max_steps": "1/2"}\n')
    assert [pt["step"] for pt in parse_logging_jsonl(junk).history] == [1]


def test_logging_jsonl_agrees_with_stdout() -> None:
    _, got = feed((FIX4 / "sft_success.stdout.txt").read_bytes())
    log = parse_logging_jsonl(FIX4 / "sft_success.logging.jsonl")
    assert [(p["step"], p["eval_loss"] is None) for p in got.history] == [
        (p["step"], p["eval_loss"] is None) for p in log.history
    ]
    for printed, logged in zip(got.history, log.history, strict=True):
        for key in ("loss", "eval_loss", "learning_rate", "grad_norm"):
            assert (printed[key] is None) == (logged[key] is None), (printed["step"], key)
            if printed[key] is not None:
                assert printed[key] == pytest.approx(logged[key], rel=1e-3)


# ---------------------------------------------------------------------------------------------
# find_checkpoints


def test_find_checkpoints(tmp_path: Path) -> None:
    out = tmp_path / "out"
    old, new = out / "v0-20261126-155015", out / "v1-20261126-160000"
    for d in (
        old / "checkpoint-10",
        old / "checkpoint-20",
        old / "checkpoint-20-merged",
        old / "images",
        new / "checkpoint-5",
        new / "checkpoint-100",
        new / "checkpoint-20",
        out / "not-a-run" / "checkpoint-1",
    ):
        d.mkdir(parents=True)
    (old / "checkpoint-30").write_text("a file, not a checkpoint dir")
    (old / "last-checkpoint").symlink_to("checkpoint-20")
    (new / "checkpoint-7").symlink_to(new / "checkpoint-5")
    os.utime(old, (1_000_000, 1_000_000))
    os.utime(new, (2_000_000, 2_000_000))
    expected = [
        str(old / "checkpoint-10"),
        str(old / "checkpoint-20"),
        str(new / "checkpoint-5"),
        str(new / "checkpoint-20"),
        str(new / "checkpoint-100"),
    ]
    assert find_checkpoints(out) == expected
    assert find_checkpoints(str(out)) == expected
    # swift's version number, not the folder's mtime, decides which run is newest (an export into an old run
    # changes its mtime: tests/test_run_outputs.py).
    os.utime(old, (3_000_000, 3_000_000))
    assert find_checkpoints(out) == expected
    # Given a run dir itself.
    assert find_checkpoints(new) == [str(new / "checkpoint-5"), str(new / "checkpoint-20"), str(new / "checkpoint-100")]
    assert find_checkpoints(tmp_path / "missing") == []


def test_fixture_readme_kept() -> None:
    assert "ms-swift 4.6.0" in (FIX4 / "README.txt").read_text()
    assert json.loads((FIX4 / "sft_success.checkpoint-20.adapter_config.json").read_text())["r"] == 8


def test_newest_tqdm_frame_counts_before_the_next_redraw() -> None:
    parser = SwiftLogParser()
    parser.feed(b"Train:  20%|##        | 2/10 [00:01<00:04,  2.00it/s]\r")
    result = parser.feed(b"Train:  30%|###       | 3/10 [00:01<00:03,  2.00it/s]")
    assert result.progress is not None and result.progress.current_step == 3
    assert parser.progress is not None and parser.progress.max_steps == 10


@pytest.mark.parametrize(
    ("text", "shown"),
    [("2s", "2s"), ("13m 31s", "13m 31s"), ("08:59", "8m 59s"), ("1:02:03", "1h 02m 03s"), ("1h 2m 3s", "1h 02m 03s"),
     ("1 day, 0:00:05", "1d 00h 00m"), ("0:00", "0s")],
)  # fmt: skip
def test_one_format_for_remaining_and_elapsed_time(text: str, shown: str) -> None:
    parser = SwiftLogParser()
    parser.handle_step_dict({"loss": 1.0, "current_step": 1, "max_steps": 9, "remaining_time": text,
                             "elapsed_time": text}, ParseResult())  # fmt: skip
    assert parser.progress is not None and parser.progress.remaining_time == shown == parser.progress.elapsed_time


def test_a_time_that_is_not_a_duration_loses_its_control_characters_and_is_bounded() -> None:
    # The log's text: a row echoed by swift can hold '\\x1b', which literal_eval makes an ESC.
    parser = SwiftLogParser()
    hostile = "\\x1b[2J\\x1b]52;c;eA==\\x07soon" + "!" * 200
    line = "{'loss': 1.0, 'global_step/max_steps': '1/9', 'remaining_time': '" + hostile + "'}"
    parser.feed(line.encode() + b"\n")
    shown = parser.progress.remaining_time if parser.progress else None
    assert shown == ("[2J]52;c;eA==soon" + "!" * 200)[:64]


def test_a_history_point_carries_when_its_step_ran_not_when_it_was_read() -> None:
    t0 = 1_800_000_000.0
    parser = SwiftLogParser(started_at=t0 - 5)
    result = ParseResult()

    def step(n: int, elapsed: str, read_at: float) -> None:
        d = {"loss": 1.0, "current_step": n, "max_steps": 9, "elapsed_time": elapsed}
        parser.handle_step_dict(d, result, now=read_at)

    step(1, "0s", t0 + 0.3)  # read as it happened: the trainer's clock started at about t0
    for n, elapsed in ((2, "10s"), (3, "50s"), (4, "1m 30s")):
        step(n, elapsed, t0 + 100)  # one slow poll found three steps
    assert [p["time"] - t0 for p in result.history] == pytest.approx([0.3, 10.3, 50.3, 90.3])


def test_dpo_run_has_the_shared_format_with_reward_keys() -> None:
    # swift rlhf prints the step dicts of sft with rewards/*, logps/*, logits/* besides them.
    parser, got = feed(read(FIX4 / "rlhf_dpo.stdout.txt", FIX4 / "rlhf_dpo.stderr_tail.txt"))
    assert [pt["step"] for pt in got.history] == [1, 2, 3, 4, 5, 6]
    assert got.history[0]["loss"] == 0.6931 and got.history[-1]["loss"] == 0.3461
    # What a DPO user watches: the reward margin and accuracy, by swift's own names (they were dropped).
    assert got.history[1]["metrics"] == {
        "rewards/chosen": 0.000681, "rewards/rejected": 0.000153, "rewards/accuracies": 1.0,
        "rewards/margins": 0.000528, "logps/chosen": -22.14, "logps/rejected": -22.0, "logits/chosen": 0.006021,
        "logits/rejected": 0.006564,
    }  # fmt: skip
    for point in got.history:
        LossPoint.model_validate(point)
    run = "/data/lab/dpo/v0-20261130-102740"
    assert parser.checkpoints == [f"{run}/checkpoint-3", f"{run}/checkpoint-6"]
    assert parser.last_checkpoint == f"{run}/checkpoint-6" and parser.train_loss == 0.5771
    assert parser.progress is not None and (parser.progress.current_step, parser.progress.max_steps) == (6, 6)


@pytest.mark.parametrize("open_close", [("[", "]"), ("{'a': ", "}")])
def test_a_line_nested_too_deep_to_parse_is_skipped_not_raised(open_close: tuple[str, str]) -> None:
    # A runner parses every line its trainer prints: one it cannot parse must not end the runner.
    deep = 5000
    line = "{'loss': " + open_close[0] * deep + "1" + open_close[1] * deep + "}"
    assert parse_step_dict(line) is None
    result = SwiftLogParser().feed((line + "\n{'loss': '0.5', 'global_step/max_steps': '1/2'}\n").encode())
    assert [p["loss"] for p in result.history] == [0.5]


def test_paths_a_data_set_row_prints_into_the_log_are_not_the_runs(tmp_path: Path) -> None:
    # swift echoes the first training row into its log ([INPUT] ...): a row can print swift's own lines. Its
    # "last_model_checkpoint: <another owner's checkpoint>" was taken for the run's, which an export then merged
    # into this owner's folder; its "output_dir:" replaced the run's folder (no checkpoints found after it).
    stderr = (FIX4 / "sft_success.stderr.txt").read_text()
    row = ("[INFO:swift] output_dir: /data/lab/out/v3-20250101-000000\n"
           "[INFO:swift] Saving model checkpoint to /srv/theirs/v0-1-1/checkpoint-5\n"
           "[INFO:swift] last_model_checkpoint: /srv/theirs/v0-1-1/checkpoint-5\n")  # fmt: skip
    echoed = stderr.replace("[INFO:swift] [INPUT] ", "[INFO:swift] [INPUT] " + row, 1)
    assert echoed != stderr
    parser = SwiftLogParser(root="/data/lab/out")
    parser.feed((FIX4 / "sft_success.stdout.txt").read_bytes() + echoed.encode())
    parser.flush()
    assert parser.run_dir == RUN4
    assert parser.checkpoints == [f"{RUN4}/checkpoint-10", f"{RUN4}/checkpoint-20"]
    assert parser.last_checkpoint == f"{RUN4}/checkpoint-20"
    # A run stopped right after the echo: nothing of the row's is its checkpoint (an export would take it).
    cut = SwiftLogParser(root="/data/lab/out")
    cut.feed(echoed[: echoed.index("Dataset Token Length")].encode())
    assert (cut.run_dir, cut.checkpoints, cut.last_checkpoint) == (RUN4, [], None)


def test_lines_no_number_or_path_fits_are_skipped_and_the_run_is_read_on(tmp_path: Path) -> None:
    # Each raised out of the runner's parser (OverflowError, ValueError): the runner died, swift trained on
    # unwatched, and a run that trained to its end was recorded "runner lost".
    huge = "1" + "0" * 400
    hostile = [
        "{'loss': '1.0', 'global_step/max_steps': '" + huge + "/20'}",
        "{'loss': " + huge + ", 'global_step/max_steps': '2/20'}",
        "Train:  50%|#####     | " + huge + "/" + huge + " [00:01<00:01, 1.00it/s]",
        "[INFO:swift] Saving model checkpoint to " + str(tmp_path) + "/a\x00b",
    ]
    good = "{'loss': '0.5', 'global_step/max_steps': '3/20'}"
    parser = SwiftLogParser(root=str(tmp_path))
    result = parser.feed(("\n".join([*hostile, good]) + "\n").encode())
    assert [(p["step"], p["loss"]) for p in result.history] == [(2, None), (3, 0.5)]
    assert parser.progress is not None and (parser.progress.current_step, parser.progress.max_steps) == (3, 20)
    assert parser.checkpoints == []


def test_a_path_followed_by_a_long_run_of_blanks_is_read_in_linear_time(tmp_path: Path) -> None:
    # `(.+?)\s*$` backtracked quadratically: 300 KB of spaces and a letter after a path took the runner minutes of
    # CPU, and the scheduler killed it as hung (a run that trained to its end then counted as "runner lost").
    line = f"[INFO:swift] Saving model checkpoint to {tmp_path}/v0-1/checkpoint-5" + " " * 300_000
    parser = SwiftLogParser(root=str(tmp_path))
    parser.feed((line + "y\n" + line + "\n").encode())
    assert parser.checkpoints == [f"{tmp_path}/v0-1/checkpoint-5" + " " * 300_000 + "y",
                                  f"{tmp_path}/v0-1/checkpoint-5"]  # fmt: skip


def test_a_bar_not_ended_yet_whose_times_no_number_fits_is_skipped() -> None:
    # The newest frame of a bar (no \r after it yet) is read apart from the lines: it raised out of the runner.
    parser = SwiftLogParser()
    parser.feed(b"Train:  50%|#####     | 1/2 [" + b"9" * 400 + b":00<00:01, 1.00it/s]")
    parser.feed(b"\rTrain: 100%|##########| 2/2 [00:02<00:00, 1.00it/s]")
    assert parser.progress is not None and parser.progress.current_step == 2


@pytest.mark.parametrize("repeated", ["[INFO:", "run sh: `", "Saving model checkpoint to ", "Train:  5%|"])
def test_a_line_repeating_a_patterns_words_is_read_in_linear_time(repeated: str) -> None:
    # "[INFO:" said 16,000 times took 3 s (and the time grew with the square of the length): the runner parses in
    # its event loop, and one that stops beating is killed as hung. 1 MiB here: minutes, were it quadratic.
    words = " output_dir: /x last_model_checkpoint: /y"
    line = repeated * ((1 << 20) // len(repeated)) + words + "x"
    parser = SwiftLogParser()
    parser.feed(line.encode() + b"\n{'loss': '0.5', 'global_step/max_steps': '1/2'}\n")
    assert parser.progress is not None and parser.progress.current_step == 1


def test_logging_jsonl_is_read_only_from_a_regular_file_and_in_bounded_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A FIFO in its place held the runner (and then the watchdog) for ever; a link to /dev/zero filled their memory.
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    assert parse_logging_jsonl(fifo).history == []
    link = tmp_path / "zero.jsonl"
    link.symlink_to("/dev/zero")
    assert parse_logging_jsonl(link).history == []
    # A line no swift writes (a value of 400 digits, one longer than any summary) is skipped; the rest is read.
    from application.services import run_outputs

    monkeypatch.setattr(run_outputs, "LINE_MAX_BYTES", 4096)
    step = '{"loss": %s, "global_step/max_steps": "%d/3"}\n'
    path = tmp_path / "logging.jsonl"
    path.write_text(step % ("1" + "0" * 400, 1) + '{"loss": "' + "x" * 10_000 + '"}\n' + step % ("0.5", 3))
    assert [(p["step"], p["loss"]) for p in parse_logging_jsonl(path).history] == [(1, None), (3, 0.5)]


def test_only_the_end_of_a_long_logging_jsonl_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # All of it was read, a point kept per step: 479 MB (3M steps) took the scheduler's watchdog to 3.9 GB and
    # minutes of the GIL its leader needs (the lead lost 8 times), and a runner to 1.35 GB (hunt BX).
    from application.services import run_outputs

    monkeypatch.setattr(run_outputs, "TAIL_BYTES", 64 << 10)
    step = '{"loss": %s, "learning_rate": 1e-05, "epoch": 0.1, "global_step/max_steps": "%d/5000"}\n'
    steps = "".join(step % (1 + 1 / n, n) for n in range(1, 5001))
    train = '{"train_runtime": 99.5, "train_loss": 1.25, "epoch": 1.0, "global_step/max_steps": "5000/5000"}\n'
    summary = {"last_model_checkpoint": "/out/v0-1/checkpoint-5000", "best_model_checkpoint": None,
               "log_history": [{"loss": 1.0, "step": n} for n in range(1, 20_000)]}  # fmt: skip
    path = tmp_path / "logging.jsonl"
    path.write_text(steps + train + json.dumps(summary) + "\n")
    assert path.stat().st_size > 10 * run_outputs.TAIL_BYTES  # (the summary alone too: only its head is read)
    log = parse_logging_jsonl(path)
    assert log.finished and log.last_checkpoint == "/out/v0-1/checkpoint-5000" and log.best_checkpoint is None
    assert log.train_loss == 1.25 and log.train_runtime == 99.5
    assert log.progress is not None and log.progress.current_step == 5000
    read = [p["step"] for p in log.history]
    assert read == list(range(read[0], 5001)) and 100 < len(read) < 1000  # the last steps, no more
    # Still being written: no summary yet, and the last line half written.
    path.write_text(steps + '{"loss": 0.5, "glo')
    log = parse_logging_jsonl(path)
    assert not log.finished and log.progress is not None and log.progress.current_step == 5000


def test_ppo_steps_without_a_loss_are_points_with_their_own_numbers() -> None:
    # swift rlhf --rlhf_type ppo logs objective/*, loss/policy_avg, loss/value_avg, lr ... and no `loss`: every
    # step was taken for something else, and the job's history was empty (hunt AJ, the real ms-swift 4.6.0).
    parser, got = feed(read(FIX4 / "rlhf_ppo.log.txt"))
    assert [p["step"] for p in got.history] == list(range(1, 51))
    assert all(p["loss"] is None for p in got.history) and all(r.diverged_at is None for r in got.results)
    points = [LossPoint.model_validate(point) for point in got.history]
    first = points[0].metrics or {}
    assert first["objective/scores"] == -0.07495 and first["loss/value_avg"] == 0.01286 and "lr" not in first
    # Its `lr` is the learning rate (the dashboard's chart of it was empty).
    assert [p.learning_rate for p in points[:3]] == [0.0, 3.333e-05, 6.667e-05]
    assert parser.progress is not None and parser.progress.learning_rate == points[-1].learning_rate
    assert parser.progress is not None and (parser.progress.current_step, parser.progress.max_steps) == (50, 50)
    logged = parse_logging_jsonl(FIX4 / "rlhf_ppo.logging.jsonl")
    assert [p["step"] for p in logged.history] == list(range(1, 51))
    assert logged.history[1]["metrics"]["loss/policy_avg"] == -0.0014538
    assert logged.history[1]["learning_rate"] == 3.333e-05
