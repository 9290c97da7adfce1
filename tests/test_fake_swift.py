"""The fake `swift` run for real, as a subprocess, and read back with the real parser."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from application.services.log_parser import SwiftLogParser
from application.services.run_outputs import find_checkpoints, parse_logging_jsonl
from application.services.swift_errors import extract_error
from application.utils.log_tail import tail_lines
from tests.conftest import gone, wait_for

FAKE_SWIFT = Path(__file__).resolve().parent / "fake_swift" / "swift"
ROW = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'


class Workspace:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.model = root / "models" / "tiny-qwen2"
        self.model.mkdir(parents=True)
        (self.model / "config.json").write_text('{"model_type": "qwen2"}')
        self.data = root / "data.jsonl"
        self.data.write_text(ROW * 10)
        self.out = root / "out"
        self.log = root / "swift.log"

    def dataset(self, **options: object) -> Path:
        path = self.root / "controlled.jsonl"
        path.write_text(json.dumps({"fake_swift": options}) + "\n" + ROW * 10)
        return path

    def env(self, version: str = "4.6.0", **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_SWIFT") and k != "CUDA_VISIBLE_DEVICES"}
        env["FAKE_SWIFT_VERSION"] = version
        env["FAKE_SWIFT_STEP_SECONDS"] = "0"
        env.update(extra)
        return env

    def sft_args(self, *extra: str, dataset: Path | None = None, tuner: str = "--tuner_type") -> list[str]:
        return [
            "sft",
            "--model",
            str(self.model),
            tuner,
            "lora",
            "--dataset",
            str(dataset or self.data),
            "--output_dir",
            str(self.out),
            *extra,
        ]

    def run(self, args: list[str], env: dict[str, str] | None = None) -> int:
        with self.log.open("wb") as log:
            proc = subprocess.run(
                [str(FAKE_SWIFT), *args], stdout=log, stderr=subprocess.STDOUT, env=env or self.env(), timeout=60
            )
        return proc.returncode

    def start(self, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with self.log.open("wb") as log:
            return subprocess.Popen(
                [str(FAKE_SWIFT), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env or self.env(),
                start_new_session=True,
            )

    def parse(self, chunk: int = 777) -> SwiftLogParser:
        data = self.log.read_bytes()
        parser = SwiftLogParser()
        for i in range(0, len(data), chunk):
            parser.feed(data[i : i + chunk])
        parser.flush()
        return parser

    def steps_logged(self) -> list[int]:
        steps: list[int] = []
        parser = SwiftLogParser()
        for point in parser.feed(self.log.read_bytes()).history:
            steps.append(int(point["step"]))
        return steps

    def error(self) -> str | None:
        return extract_error(tail_lines(self.log, 50))

    def run_dirs(self) -> list[Path]:
        return sorted(self.out.glob("v*-*"))


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Started process groups; whatever a test leaves running is killed."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------------
# Training that works


def test_sft_success_4x(ws: Workspace) -> None:
    rc = ws.run(
        ws.sft_args("--max_steps", "12", "--logging_steps", "2", "--save_steps", "5", "--save_total_limit", "2")
    )
    assert rc == 0
    [run_dir] = ws.run_dirs()
    assert run_dir.name.startswith("v0-")
    assert (run_dir / "args.json").is_file()
    assert json.loads((run_dir / "args.json").read_text())["max_steps"] == 12
    # checkpoint-5 rotated away by save_total_limit 2; the last step is always saved.
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-12"]
    final = run_dir / "checkpoint-12"
    for name in ("adapter_config.json", "adapter_model.safetensors", "trainer_state.json"):
        assert (final / name).is_file()
    assert json.loads((final / "trainer_state.json").read_text())["global_step"] == 12
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(ws.model)
    assert os.readlink(run_dir / "last-checkpoint") == "checkpoint-12"

    first_line = ws.log.read_text().split("\n")[0]
    assert first_line.startswith("run sh: `") and first_line.endswith("`")

    parser = ws.parse()
    assert parser.command_line is not None and "--tuner_type lora" in parser.command_line
    assert parser.run_dir == str(run_dir)
    assert parser.checkpoints == [str(run_dir / f"checkpoint-{n}") for n in (5, 10, 12)]
    assert parser.last_checkpoint == str(final)
    assert parser.best_checkpoint is None  # 4.x default split_dataset_ratio 0: no eval
    assert parser.training_ended
    assert parser.train_loss is not None and parser.train_runtime is not None
    p = parser.progress
    assert p is not None
    assert (p.current_step, p.max_steps, p.percentage) == (12, 12, 100.0)
    assert p.memory_gib is None  # no GPU
    assert ws.steps_logged() == [1, 2, 4, 6, 8, 10, 12]
    losses = [pt["loss"] for pt in SwiftLogParser().feed(ws.log.read_bytes()).history]
    assert losses[0] > losses[-1]

    log = parse_logging_jsonl(run_dir / "logging.jsonl")
    assert log.finished and log.last_checkpoint == str(final)
    assert [pt["step"] for pt in log.history] == [1, 2, 4, 6, 8, 10, 12]
    assert find_checkpoints(ws.out) == [str(run_dir / "checkpoint-10"), str(final)]
    assert ws.error() is None


def test_4x_dict_format_matches_real_swift(ws: Workspace) -> None:
    assert ws.run(ws.sft_args("--max_steps", "3", "--logging_steps", "1")) == 0
    dict_lines = [s for s in ws.log.read_text().replace("\r", "\n").split("\n") if s.startswith("{'")]
    first = dict_lines[0]
    assert first.startswith("{'loss': '")
    assert "'global_step/max_steps': '1/3'" in first
    assert "'train_speed(s/it)': '" in first
    assert "percentage" not in first
    assert dict_lines[-1].startswith("{'train_runtime': '")


def test_default_twenty_steps_and_second_run_gets_v1(ws: Workspace) -> None:
    assert ws.run(ws.sft_args()) == 0
    assert ws.steps_logged() == [1, 5, 10, 15, 20]  # swift's default logging_steps is 5
    assert [p.name for p in ws.run_dirs()[0].glob("checkpoint-*")] == ["checkpoint-20"]
    assert ws.run(ws.sft_args("--max_steps", "2")) == 0
    assert [p.name[:3] for p in ws.run_dirs()] == ["v0-", "v1-"]
    assert find_checkpoints(ws.out)[-1].endswith("checkpoint-2")


def test_sft_success_3x(ws: Workspace) -> None:
    env = ws.env("3.5.3")
    assert ws.run(ws.sft_args("--max_steps", "6", "--logging_steps", "2", tuner="--train_type"), env) == 0
    text = ws.log.read_text()
    assert "swift.__version__: 3.5.3" in text
    dict_lines = [s for s in text.replace("\r", "\n").split("\n") if s.startswith("{'")]
    assert "'percentage': '33.33%'" in dict_lines[1]
    assert "'train_speed(iter/s)': " in dict_lines[0]
    assert "'loss': '" not in dict_lines[0]  # numbers, not strings
    [run_dir] = ws.run_dirs()
    assert not (run_dir / "last-checkpoint").exists()  # 3.x makes no symlink
    parser = ws.parse()
    assert parser.progress is not None and parser.progress.percentage == 100.0
    assert parser.progress.memory_gib == 0.0
    # 3.x evaluates by default (split_dataset_ratio 0.01).
    history = SwiftLogParser().feed(ws.log.read_bytes()).history
    assert [pt["step"] for pt in history if pt["eval_loss"] is not None] == [6]
    assert parser.best_checkpoint == parser.last_checkpoint == str(run_dir / "checkpoint-6")


def test_bf16_with_a_gpu_and_memory_in_dicts(ws: Workspace) -> None:
    env = ws.env(CUDA_VISIBLE_DEVICES="0")
    assert ws.run(ws.sft_args("--torch_dtype", "bfloat16", "--max_steps", "2"), env) == 0
    parser = ws.parse()
    assert parser.progress is not None and parser.progress.memory_gib == 1.23


def test_hub_ids_are_accepted(ws: Workspace) -> None:
    args = ["sft", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--tuner_type", "lora"]
    args += ["--dataset", "AI-ModelScope/coco#20000", "--output_dir", str(ws.out), "--max_steps", "1"]
    assert ws.run(args) == 0


# ---------------------------------------------------------------------------------------------
# Failures, each with the captured real error


def test_missing_model(ws: Workspace) -> None:
    args = ws.sft_args()
    args[2] = str(ws.root / "no-such-model")
    assert ws.run(args) == 1
    assert ws.error() == f"ValueError: path: '{ws.root / 'no-such-model'}' not found"
    assert not ws.out.exists()


def test_missing_dataset_leaves_an_empty_run_dir(ws: Workspace) -> None:
    missing = ws.root / "does_not_exist.jsonl"
    assert ws.run(ws.sft_args(dataset=missing)) == 1
    assert ws.error() == (
        f"ValueError: The local path does not exist, dataset_id: `{missing}`. os.path.exists(dataset_id): False"
    )
    [run_dir] = ws.run_dirs()
    assert list(run_dir.iterdir()) == []
    assert ws.parse().run_dir == str(run_dir)


@pytest.mark.parametrize(("version", "flag"), [("4.6.0", "--train_type"), ("3.5.3", "--tuner_type")])
def test_tuner_flag_of_the_other_version(ws: Workspace, version: str, flag: str) -> None:
    assert ws.run(ws.sft_args(tuner=flag), ws.env(version)) == 1
    assert ws.error() == f"ValueError: remaining_argv: ['{flag}', 'lora']"
    [run_dir] = ws.run_dirs()
    assert list(run_dir.iterdir()) == []


def test_bf16_without_a_gpu(ws: Workspace) -> None:
    assert ws.run(ws.sft_args("--torch_dtype", "bfloat16")) == 1
    assert ws.error() == (
        "ValueError: Your setup doesn't support bf16/gpu. "
        "You need to assign use_cpu if you want to train the model on CPU."
    )
    assert ws.run(ws.sft_args("--torch_dtype", "bfloat16"), ws.env(CUDA_VISIBLE_DEVICES="")) == 1


def test_fail_at_step(ws: Workspace) -> None:
    data = ws.dataset(fail_at_step=3)
    assert ws.run(ws.sft_args("--max_steps", "10", "--logging_steps", "1", dataset=data)) == 1
    assert ws.error() == "RuntimeError: fake_swift failure at step 3"
    assert ws.steps_logged() == [1, 2]
    assert not ws.parse().training_ended


def test_fail_message_and_exit_code(ws: Workspace) -> None:
    data = ws.dataset(fail_at_step=1, fail_message="torch.OutOfMemoryError: CUDA out of memory.", exit_code=7)
    assert ws.run(ws.sft_args(dataset=data)) == 7
    assert ws.error() == "torch.OutOfMemoryError: CUDA out of memory."
    assert ws.run(ws.sft_args("--max_steps", "2", dataset=ws.dataset(exit_code=3))) == 3
    assert ws.parse().training_ended


def test_resume_from_checkpoint(ws: Workspace) -> None:
    assert ws.run(ws.sft_args("--max_steps", "4", "--save_steps", "2")) == 0
    ckpt = ws.run_dirs()[0] / "checkpoint-2"
    assert ws.run(ws.sft_args("--max_steps", "6", "--logging_steps", "1", "--resume_from_checkpoint", str(ckpt))) == 0
    assert ws.steps_logged() == [3, 4, 5, 6]
    # As captured from ms-swift 4.6.0: a new run folder, the checkpoints of the resumed run go there.
    first, second = ws.run_dirs()[:2]
    assert first != second and (second / "checkpoint-6").is_dir() and not (first / "checkpoint-6").exists()
    runs = len(ws.run_dirs())
    assert ws.run(ws.sft_args("--resume_from_checkpoint", str(ws.root / "nope"))) == 1
    assert ws.error() == f"FileNotFoundError: path: '{ws.root / 'nope'}'"
    assert len(ws.run_dirs()) == runs  # it fails while reading its arguments: no run folder
    # A folder that is not a checkpoint gets past the arguments and fails in the trainer, as in transformers.
    (ws.root / "empty").mkdir()
    assert ws.run(ws.sft_args("--resume_from_checkpoint", str(ws.root / "empty"))) == 1
    assert ws.error() == f"ValueError: Can't find a valid checkpoint at {ws.root / 'empty'}"


def test_checkpoints_hold_optimizer_state_unless_save_only_model(ws: Workspace) -> None:
    assert ws.run(ws.sft_args("--max_steps", "2", "--save_steps", "2")) == 0
    assert (ws.run_dirs()[-1] / "checkpoint-2" / "optimizer.pt").is_file()
    assert ws.run(ws.sft_args("--max_steps", "2", "--save_steps", "2", "--save_only_model", "true")) == 0
    ckpt = ws.run_dirs()[-1] / "checkpoint-2"
    assert (ckpt / "trainer_state.json").is_file() and not (ckpt / "scheduler.pt").exists()


def test_sigkill_at_step_only_in_a_fresh_run(ws: Workspace) -> None:
    data = ws.dataset(sigkill_at_step=3)
    code = ws.run(ws.sft_args("--max_steps", "5", "--save_steps", "2", "--logging_steps", "1", dataset=data))
    assert code in (-9, 247, 137)  # the launcher passes its trainer's -9 on, as real swift's does
    ckpt = ws.run_dirs()[-1] / "checkpoint-2"
    resumed = ws.sft_args("--max_steps", "5", "--logging_steps", "1", "--resume_from_checkpoint", str(ckpt),
                          dataset=data)  # fmt: skip
    assert ws.run(resumed) == 0
    assert ws.steps_logged() == [3, 4, 5]


# ---------------------------------------------------------------------------------------------
# Export


@pytest.mark.parametrize("version", ["4.6.0", "3.5.3"])
def test_export_merge_then_exists(ws: Workspace, version: str) -> None:
    tuner = "--train_type" if version.startswith("3") else "--tuner_type"
    assert ws.run(ws.sft_args("--max_steps", "2", tuner=tuner), ws.env(version)) == 0
    ckpt = ws.run_dirs()[0] / "checkpoint-2"
    merged = Path(f"{ckpt}-merged")

    assert ws.run(["export", "--adapters", str(ckpt), "--merge_lora", "true"], ws.env(version)) == 0
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    parser = ws.parse()
    assert parser.merged_path == str(merged)
    assert parser.command_line is not None and "export --adapters" in parser.command_line
    assert str(ws.model) in ws.log.read_text()  # the base model, read from the checkpoint's args.json
    assert find_checkpoints(ws.out) == [str(ckpt)]  # -merged is no checkpoint

    assert ws.run(["export", "--adapters", str(ckpt), "--merge_lora", "true"], ws.env(version)) == 1
    assert ws.error() == f"FileExistsError: args.output_dir: `{merged}` already exists."

    args = ["export", "--adapters", str(ckpt), "--merge_lora", "true", "--exist_ok", "true"]
    assert ws.run(args, ws.env(version)) == 0
    assert ws.parse().merged_path == str(merged)

    other = ws.root / "merged-elsewhere"
    assert ws.run(["export", "--adapters", str(ckpt), "--merge_lora", "true", "--output_dir", str(other)]) == 0
    assert (other / "model.safetensors").is_file()
    assert ws.parse().merged_path == str(other)


def test_export_missing_checkpoint(ws: Workspace) -> None:
    missing = ws.root / "nope" / "checkpoint-9"
    assert ws.run(["export", "--adapters", str(missing), "--merge_lora", "true"]) == 1
    assert ws.error() == f"ValueError: path: '{missing}' not found"
    assert not Path(f"{missing}-merged").exists()


def test_unknown_command(ws: Workspace) -> None:
    assert ws.run(["infer", "--model", "x"]) == 2


# ---------------------------------------------------------------------------------------------
# Processes and signals


def started_run(
    ws: Workspace, procs: list[subprocess.Popen[bytes]], **options: object
) -> tuple[subprocess.Popen[bytes], psutil.Process]:
    data = ws.dataset(**options)
    proc = ws.start(ws.sft_args("--max_steps", "100000", "--logging_steps", "1", dataset=data))
    procs.append(proc)
    wait_for(lambda: len(ws.steps_logged()) >= 2, what="two logged steps")
    children = psutil.Process(proc.pid).children()
    assert len(children) == 1
    trainer = children[0]
    assert os.getpgid(trainer.pid) == os.getpgid(proc.pid) == proc.pid
    return proc, trainer


def test_sigterm_to_the_process_group_stops_everything(ws: Workspace, procs: list[subprocess.Popen[bytes]]) -> None:
    proc, trainer = started_run(ws, procs, step_seconds=0.01)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=10) == -signal.SIGTERM
    wait_for(lambda: gone(trainer.pid), what="the trainer to exit")
    assert gone(proc.pid)


def test_sigterm_to_the_launcher_alone_leaves_the_trainer(ws: Workspace, procs: list[subprocess.Popen[bytes]]) -> None:
    # Real swift does the same: the launcher dies, its child trains on (README of the fixtures).
    proc, trainer = started_run(ws, procs, step_seconds=0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == -signal.SIGTERM
    seen = len(ws.steps_logged())
    wait_for(lambda: len(ws.steps_logged()) > seen + 2, what="the orphaned trainer to go on")
    assert not gone(trainer.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    wait_for(lambda: gone(trainer.pid), what="the trainer to die")


def test_ignore_sigterm_needs_sigkill(ws: Workspace, procs: list[subprocess.Popen[bytes]]) -> None:
    proc, trainer = started_run(ws, procs, step_seconds=0.01, ignore_sigterm=True)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=10) == -signal.SIGTERM
    seen = len(ws.steps_logged())
    wait_for(lambda: len(ws.steps_logged()) > seen + 2, what="the trainer to ignore SIGTERM")
    assert not gone(trainer.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    wait_for(lambda: gone(trainer.pid), what="SIGKILL to work")


def test_sigint_to_the_process_group(ws: Workspace, procs: list[subprocess.Popen[bytes]]) -> None:
    proc, trainer = started_run(ws, procs, step_seconds=0.01)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=10) == -signal.SIGINT
    wait_for(lambda: gone(trainer.pid), what="the trainer to exit")
    parser = ws.parse()
    assert parser.training_ended and parser.last_checkpoint is None
    assert ws.error() == "KeyboardInterrupt"  # the launcher's, as in the captured real run


def test_hang_after_steps(ws: Workspace, procs: list[subprocess.Popen[bytes]]) -> None:
    data = ws.dataset(hang_after_steps=3)
    proc = ws.start(ws.sft_args("--max_steps", "50", "--logging_steps", "1", dataset=data))
    procs.append(proc)
    wait_for(lambda: ws.steps_logged() == [1, 2, 3], what="three steps")
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.5)
    assert ws.steps_logged() == [1, 2, 3]
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=10) == -signal.SIGTERM


def test_step_seconds_from_env(ws: Workspace) -> None:
    started = time.monotonic()
    assert ws.run(ws.sft_args("--max_steps", "5"), ws.env(FAKE_SWIFT_STEP_SECONDS="0.1")) == 0
    assert time.monotonic() - started >= 0.5
