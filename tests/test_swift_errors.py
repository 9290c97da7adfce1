"""extract_error against every failure tail captured from real ms-swift 4.6.0 and 3.5.3 (tests/fixtures/swift)."""

from __future__ import annotations

from pathlib import Path

import pytest

from application.services.swift_errors import extract_error

FIX4 = Path(__file__).parent / "fixtures" / "swift"
FIX3 = FIX4 / "ms-swift-3.5.3"


def read(*paths: Path) -> bytes:
    return b"".join(p.read_bytes() for p in paths)


EXPECTED_ERRORS = {
    (FIX4, "fail_bf16_on_cpu"): "ValueError: Your setup doesn't support bf16/gpu. You need to assign use_cpu "
    "if you want to train the model on CPU.",
    (FIX4, "fail_dataset"): "ValueError: The local path does not exist, dataset_id: "
    "`/data/lab/does_not_exist.jsonl`. os.path.exists(dataset_id): False",
    (FIX4, "fail_hubid"): "modelscope_hub.errors.NetworkError: [E1020] Connection failed: "
    "_DownloadHTTPSConnectionPool(host='modelscope.cn', port=443): Max retries exceeded with url: "
    "/api/v1/models/Qwen/Qwen2.5-0.5B-Instruct/repo/files?Revision=master&Recursive=True (Caused by "
    "NameResolutionError(\"_DownloadHTTPSConnection(host='modelscope.cn', port=443): Failed to resolve "
    "'modelscope.cn' ([Errno -2] Name or service not known)\"))",
    (FIX4, "fail_model"): "ValueError: path: '/data/lab/no-such-model' not found",
    (FIX4, "fail_no_model_type"): "ValueError: Failed to automatically match `model_type` for "
    "`/data/lab/tiny-qwen2`. Multiple possible types found: ['qwen2', 'qwen2_gte']. Please specify "
    "`model_type` manually. See documentation: "
    "https://swift.readthedocs.io/en/latest/Instruction/Supported-models-and-datasets.html",
    (FIX4, "fail_no_template"): "ValueError: Failed to automatically match `template_type` for "
    "`/data/lab/tiny-qwen2`. Multiple possible types found: ['qwen', 'qwen2_5', 'qwen2_5_math', "
    "'marco_o1', 'qwq_preview', 'qwq', 'deepseek_r1']. Please specify `template_type` manually via "
    "`--template`. See documentation: "
    "https://swift.readthedocs.io/en/latest/Instruction/Supported-models-and-datasets.html",
    (FIX4, "fail_unknown_arg"): "ValueError: remaining_argv: ['--train_type', 'lora']",
    (FIX4, "fail_vit_lr_on_text_model"): "AttributeError: 'ModelKeys' object has no attribute 'vision_tower'",
    (FIX4, "export_merge_exists"): "FileExistsError: args.output_dir: "
    "`/data/lab/out/v0-20261126-155015/checkpoint-20-merged` already exists.",
    (FIX4, "fail_resume_missing_checkpoint"): "FileNotFoundError: path: '/data/lab/nope/checkpoint-3'",
    (FIX4, "sigint_to_process_group"): "KeyboardInterrupt",
    (FIX4, "sigterm_to_launcher_only"): None,
    (FIX4, "rlhf_dpo"): None,  # a successful DPO run's tail: no error in it
    (FIX3, "fail_dataset"): "ValueError: The local path does not exist, dataset_id: "
    "`/data/lab/does_not_exist.jsonl`. os.path.exists(dataset_id): False",
    (FIX3, "fail_model"): "ValueError: path: '/data/lab/no-such-model' not found",
    (FIX3, "fail_tuner_type"): "ValueError: remaining_argv: ['--tuner_type', 'lora']",
}


def test_every_failure_tail_is_covered() -> None:
    tails = {(p.parent, p.name.removesuffix(".stderr_tail.txt")) for p in FIX4.glob("**/*.stderr_tail.txt")}
    assert tails == set(EXPECTED_ERRORS)


@pytest.mark.parametrize(("key", "expected"), list(EXPECTED_ERRORS.items()), ids=lambda v: str(v)[-40:])
def test_extract_error_from_real_tails(key: tuple[Path, str], expected: str | None) -> None:
    fix, name = key
    lines = (fix / f"{name}.stderr_tail.txt").read_text(encoding="utf-8", errors="replace").split("\n")
    assert extract_error(lines) == expected
    # The server passes the last lines of the combined log, stdout included.
    stdout = fix / f"{name}.stdout.txt"
    if stdout.exists():
        combined = stdout.read_text().split("\n") + lines
        assert extract_error(combined[-50:]) == expected


@pytest.mark.parametrize("fix", [FIX4, FIX3])
def test_extract_error_none_for_successful_runs(fix: Path) -> None:
    lines = read(fix / "sft_success.stdout.txt", fix / "sft_success.stderr.txt").decode().split("\n")
    assert extract_error(lines) is None
    assert extract_error(lines[-50:]) is None


def test_extract_error_prefers_trainer_error_over_launcher_noise() -> None:
    trainer = (FIX4 / "fail_model.stderr_tail.txt").read_text().split("\n")
    launcher = [
        "Traceback (most recent call last):",
        '  File "/opt/venv/bin/swift", line 8, in <module>',
        "    sys.exit(cli_main())",
        '  File "/usr/local/lib/python3.11/subprocess.py", line 571, in run',
        "    raise CalledProcessError(retcode, process.args,",
        "subprocess.CalledProcessError: Command '['/opt/venv/bin/python3', 'sft.py']' returned non-zero exit status 1.",
    ]
    assert extract_error(trainer + launcher) == "ValueError: path: '/data/lab/no-such-model' not found"
    assert extract_error(launcher) == launcher[-1]
    sigint = (FIX4 / "sigint_to_process_group.stderr_tail.txt").read_text().split("\n")
    oom = [
        "Traceback (most recent call last):",
        '  File "x.py", line 1, in f',
        "    g()",
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.",
    ]
    assert extract_error(oom + sigint) == oom[-1]


def test_extract_error_rank_prefixes_chains_and_junk() -> None:
    ranked = [
        "[rank0]: Traceback (most recent call last):",
        '[rank0]:   File "sft.py", line 1, in <module>',
        "[rank0]:     main()",
        "[rank0]: RuntimeError: NCCL error in: ../torch/csrc/distributed/c10d/NCCLUtils.hpp:268",
        "\rTrain:   1%|  | 3/300\rTrain:   1%|  | 4/300",
    ]
    assert extract_error(ranked) == "RuntimeError: NCCL error in: ../torch/csrc/distributed/c10d/NCCLUtils.hpp:268"
    chained = [
        "Traceback (most recent call last):",
        '  File "a.py", line 1, in f',
        "KeyError: 'x'",
        "",
        "During handling of the above exception, another exception occurred:",
        "",
        "Traceback (most recent call last):",
        '  File "a.py", line 3, in f',
        "ValueError: bad x",
    ]
    assert extract_error(chained) == "ValueError: bad x"
    assert extract_error([]) is None
    assert extract_error(["Train: 5%", "[INFO:swift] output_dir: /x", "ValueError in the docs: not raised"]) is None
    assert (
        extract_error(["ValueError: at the very start of a cut tail"]) == "ValueError: at the very start of a cut tail"
    )


def test_a_run_left_with_no_rows_says_why_not_only_its_last_exception() -> None:
    # Real ms-swift 4.6.0 DPO runs (hunt AJ): every row longer than max_length ended on "TypeError: 'NoneType'
    # object is not iterable"; every rejected_response null, on a bare ZeroDivisionError.
    why = ("(swift had no rows left: 'Dataset filtered, origin length: 20, filtered dataset length: 0': each row was "
           "longer than max_length or could not be read (the log's warnings name those))")  # fmt: skip
    too_long = (FIX4 / "fail_all_rows_too_long.log_tail.txt").read_text().splitlines()
    assert extract_error(too_long) == f"TypeError: 'NoneType' object is not iterable {why}"
    dropped = (FIX4 / "fail_rejected_null.log_tail.txt").read_text().splitlines()
    assert extract_error(dropped) == f"ZeroDivisionError: integer division or modulo by zero {why}"
    # Without swift's count (a tail cut above it), its warnings for the rows it dropped say it.
    cut = [line for line in dropped if "Dataset filtered" not in line]
    assert "'There are errors in the dataset, the data will be deleted' for each row" in (extract_error(cut) or "")
    # Swift logs that count for each data set: one of two emptied does not explain another error (review AM).
    other = [*too_long[:-1], "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"]
    assert extract_error(other) == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
