"""End to end with the real ms-swift CLI on the CPU: HTTP job -> `swift sft` -> checkpoint -> `swift export`.

Builds a tiny random Qwen2 model and a 50-row chat data set (tests/e2e/build_tiny_model.py, run by the
ms-swift environment's Python), starts the API server against the real `swift`, submits a CPU-only job
(`num_gpus: 0`) over HTTP and follows it to `completed` and an exported merged model.

ms-swift is installed by ./install_all.sh into .swift-venv; SWIFT_BIN points elsewhere. When it is missing
this test FAILS (it is part of the README's test command): run ./install_all.sh.

    .venv/bin/pytest tests/e2e -q -s      # -s shows the timings
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CALLER_ENV, ROOT, ApiServer, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

MAX_STEPS = 20
TRAIN_DEADLINE = 300.0
EXPORT_DEADLINE = 180.0
BUILD_TIMEOUT = 180.0
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def find_swift() -> Path:
    """SWIFT_BIN, else the project's .swift-venv, else `swift` on PATH; fail (never skip) when none exists."""
    configured = CALLER_ENV.get("SWIFT_BIN")
    candidates = [configured] if configured else [str(ROOT / ".swift-venv" / "bin" / "swift"), "swift"]
    for candidate in candidates:
        found = shutil.which(candidate)
        if found:
            return Path(found).absolute()
    pytest.fail(
        f"the real ms-swift CLI was not found (tried {', '.join(candidates)}): run ./install_all.sh "
        "(installs ms-swift with a CPU torch into .swift-venv) or set SWIFT_BIN to a `swift` executable",
        pytrace=False,
    )


def python_of(swift: Path) -> Path:
    """The Python of the environment `swift` runs in: its shebang's interpreter, else bin/python beside it."""
    with open(swift, "rb") as fh:
        first = fh.readline(512)
    if first.startswith(b"#!"):
        parts = first[2:].decode(errors="replace").split()
        if parts and Path(parts[0]).name != "env" and Path(parts[0]).exists():
            return Path(parts[0])
        if len(parts) > 1 and Path(parts[0]).name == "env" and shutil.which(parts[1]):
            return Path(shutil.which(parts[1]) or parts[1])
    sibling = swift.parent / "python"
    if sibling.exists():
        return sibling
    pytest.fail(f"cannot tell which Python runs {swift}: run ./install_all.sh", pytrace=False)


def installed_version(python: Path, dist: str) -> str:
    out = subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        pytest.fail(f"{dist} is not installed in {python} ({out.stderr.strip()[-300:]}): run ./install_all.sh",
                    pytrace=False)  # fmt: skip
    return out.stdout.strip()


def build_model(python: Path, out_dir: Path) -> tuple[Path, Path]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = subprocess.run(
        [str(python), str(Path(__file__).with_name("build_tiny_model.py")), str(out_dir)],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"building the tiny model failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    model, data = out_dir / "tiny-qwen2", out_dir / "data.jsonl"
    assert (model / "config.json").is_file() and (model / "tokenizer.json").is_file(), proc.stdout
    assert any(model.glob("*.safetensors")), list(model.iterdir())
    assert len(data.read_text().splitlines()) >= 40
    return model, data


def diagnose(server: ApiServer, job_id: str) -> str:
    """What to read when the real run went wrong: the job, its log's tail and the server's log."""
    parts = []
    try:
        job = server.job(job_id)
        keys = ("status", "error_message", "exit_code", "command_line", "last_checkpoint", "export")
        parts.append(json.dumps({k: job.get(k) for k in keys}, indent=1, default=str))
        for kind in ("train", "export"):
            r = server.http.get(f"/jobs/{job_id}/logs", params={"limit": 60, "kind": kind})
            if r.status_code == 200:
                parts.append(f"--- {kind} log (last 60 lines) ---\n" + "\n".join(r.json()["lines"]))
    except Exception as exc:  # diagnostics must not hide the real failure
        parts.append(f"(could not read the job: {exc})")
    parts.append("--- server log ---\n" + server.server_log())
    return "\n".join(parts)


def completed(server: ApiServer, job_id: str, what: str) -> dict[str, Any]:
    """The job once it ended, which must be completed (else what to read about it)."""
    try:
        job = wait_for(lambda: (j := server.job(job_id))["status"] in ("completed", "failed", "stopped") and j,
                       timeout=TRAIN_DEADLINE, interval=0.5, what=f"{what} job {job_id} to finish")  # fmt: skip
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{diagnose(server, job_id)}") from None
    assert job["status"] == "completed", diagnose(server, job_id)
    return dict(job)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, str]:
    """The real swift, its version, and a tiny model with its data set (built once for the module)."""
    swift = find_swift()
    python = python_of(swift)
    swift_version = installed_version(python, "ms-swift")
    print(f"\n[e2e] ms-swift {swift_version} at {swift} (python {python})")
    t0 = time.monotonic()
    model, data = build_model(python, tmp_path_factory.mktemp("lab"))
    print(f"[e2e] model build: {time.monotonic() - t0:.1f}s")
    return swift, model, data, swift_version


def real_server(server_factory: Callable[..., ApiServer], swift: Path, lab_dir: Path) -> ApiServer:
    return server_factory(env={
        "SWIFT_BIN": str(swift),
        "DATA_ROOTS": str(lab_dir),
        "MODEL_ROOTS": str(lab_dir),
        "SWIFT_VERSION": "",  # unset: the server must detect the version in swift's own environment
        "GPU_BACKEND": "simulated",
        "SIMULATED_GPUS": "0",
        "RUNNER_POLL_INTERVAL": "0.5",
        "STOP_GRACE_SECONDS": "10",
        "LOG_LEVEL": "INFO",
    })  # fmt: skip


def test_real_swift_sft_paused_at_a_checkpoint_resumed_and_exported(
    server_factory: Callable[..., ApiServer], tmp_path: Path, lab: tuple[Path, Path, Path, str]
) -> None:
    """One LoRA job through the whole life a user sees (one test: each real swift start costs seconds): the exact
    argv, progress and loss equal to swift's own logging.jsonl, eval, a pause after its first checkpoint, a resume
    with --resume_from_checkpoint that goes on from that step in a new run folder to max_steps, and the automatic
    export merging the final checkpoint."""
    swift, model, data, swift_version = lab
    major = int(swift_version.split(".")[0])
    t0 = time.monotonic()
    server = real_server(server_factory, swift, data.parent)
    steps, save = MAX_STEPS, 4
    # Accumulating 16 micro-batches a step makes steps slow enough on a CPU to pause well before the end (16 steps
    # after the first checkpoint: 256 micro-batches, against the 2 s a pause takes to land; with 8, a quiet machine
    # finished the run before the pause came).
    training = {
        "model_type": "qwen2", "template": "qwen2_5", "max_steps": steps, "logging_steps": 2, "save_steps": save,
        "eval_steps": 10, "split_dataset_ratio": 0.2, "gradient_accumulation_steps": 16, "max_length": 256,
        "lora_rank": 8, "lora_alpha": 16, "dataloader_num_workers": 0, "dataset_num_proc": 1, "save_total_limit": 6,
    }  # fmt: skip
    r = server.create(data_path=str(data), model_path=str(model), output_dir="e2e_real_swift", num_gpus=0,
                      auto_start=True, training=training)  # fmt: skip
    assert r.status_code == 201 and r.json()["status"] == "running", r.text
    job_id = r.json()["job_id"]
    # The probe of this swift knows the scheduler names transformers converts after a job's wait.
    bad = server.create(data_path=str(data), model_path=str(model), output_dir="e2e_bad_scheduler", num_gpus=0,
                        training={**training, "lr_scheduler_type": "cosine_min_lr"})  # fmt: skip
    assert bad.status_code == 422 and "did you mean cosine_with_min_lr" in bad.text, bad.text
    try:
        wait_for(lambda: (server.job(job_id)["last_checkpoint"] or "").endswith(f"checkpoint-{save}")
                 or server.job(job_id)["status"] != "running", timeout=TRAIN_DEADLINE, interval=0.2,
                 what="the first checkpoint")  # fmt: skip
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{diagnose(server, job_id)}") from None
    answer = server.http.post(f"/jobs/{job_id}/pause")
    paused = answer.json()
    assert answer.status_code == 200 and paused["status"] == "paused", (answer.text, diagnose(server, job_id))
    at = paused["resume_step"]
    assert at is not None and at % save == 0 and save <= at < steps, paused
    assert paused["resume_from"].endswith(f"checkpoint-{at}"), paused
    first_run = Path(server.job(job_id)["attempts"][0]["run_dir"])

    resumed = server.http.post(f"/jobs/{job_id}/resume")
    assert resumed.status_code == 200 and resumed.json()["resume_step"] == at, resumed.text
    try:
        job = wait_for(lambda: (j := server.job(job_id))["status"] in ("completed", "failed") and
                       j["export"]["status"] not in ("none", "running") and j, timeout=TRAIN_DEADLINE + EXPORT_DEADLINE,
                       interval=0.5, what="the resumed run and its export")  # fmt: skip
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{diagnose(server, job_id)}") from None
    print(f"[e2e] submit -> paused -> resumed -> completed and exported: {time.monotonic() - t0:.1f}s")
    assert job["status"] == "completed" and job["exit_code"] == 0, diagnose(server, job_id)

    # The exact argv: CPU dtype, no hub check, no vision-model flags, the version's tuner flag, the resume.
    command: list[str] = job["command"]
    assert command[:2] == [str(swift), "sft"], command
    assert command[command.index("--torch_dtype") + 1] == "float32", command
    assert command[command.index("--check_model") + 1] == "false", command
    assert "--vit_lr" not in command and "--aligner_lr" not in command, command
    assert ("--tuner_type" if major >= 4 else "--train_type") in command, command
    assert command[command.index("--model_type") + 1] == "qwen2", command
    assert command[command.index("--template") + 1] == "qwen2_5", command
    assert command[command.index("--max_steps") + 1] == str(steps)
    assert command[command.index("--resume_from_checkpoint") + 1] == paused["resume_from"], command
    assert job["env"]["CUDA_VISIBLE_DEVICES"] == "", job["env"]
    assert job["gpu_ids"] == []
    # Detected from the ms-swift environment itself (SWIFT_VERSION is unset).
    assert job["swift_version"] == swift_version, (job["swift_version"], swift_version)
    if swift_version.startswith("4."):
        assert swift_version == "4.6.0", f"install_all.sh installs ms-swift 4.6.0, found {swift_version}"

    # A new run folder, as swift does on a resume; the final checkpoint is there and is what was merged.
    output_dir = Path(job["output_dir"])
    assert output_dir.is_relative_to(tmp_path / "output"), output_dir
    second_run = Path(job["run_dir"])
    assert second_run != first_run and second_run.parent == first_run.parent == output_dir, (first_run, second_run)
    assert second_run.name.startswith("v"), second_run
    last = second_run / f"checkpoint-{steps}"
    assert job["last_checkpoint"] == str(last), job["last_checkpoint"]
    assert job["checkpoints"] and str(last) in job["checkpoints"], job["checkpoints"]
    # Each holds its adapter, but one whose save the pause cut short (a loaded machine lands the pause in a save):
    # listed as incomplete, in the first run, past the step the resume took.
    listed = {c["path"]: c for c in server.http.get(f"/jobs/{job_id}/checkpoints", params={"limit": 100}).json()[
        "checkpoints"]}  # fmt: skip
    for checkpoint in job["checkpoints"]:
        if not listed[checkpoint]["complete"]:
            assert Path(checkpoint).parent == first_run and listed[checkpoint]["step"] > at, listed[checkpoint]
            continue
        for name in ADAPTER_FILES:
            assert (Path(checkpoint) / name).is_file(), f"{checkpoint} lacks {name}: {os.listdir(checkpoint)}"

    # Progress and loss history from the real runs' per-step dicts: each logged step once, in order, to
    # max_steps, across both runs, with the numbers of swift's own logging.jsonl (stdout rounds to 4 digits).
    prog = server.http.get(f"/jobs/{job_id}/progress", params={"history_limit": 1000}).json()
    p = prog["progress"]
    assert p["current_step"] == steps and p["max_steps"] == steps, p
    losses = [pt for pt in prog["history"] if pt.get("loss") is not None]
    for pt in losses:
        assert isinstance(pt["loss"], float) and math.isfinite(pt["loss"]) and pt["loss"] > 0, pt
    logged_steps = [pt["step"] for pt in losses]
    assert logged_steps == sorted(set(logged_steps)) and logged_steps[-1] == steps, logged_steps
    assert any(s <= at for s in logged_steps) and any(s > at for s in logged_steps), logged_steps
    assert len({round(pt["loss"], 4) for pt in losses}) > 1, "every loss equal: not a real training run"
    assert any(pt.get("eval_loss") is not None for pt in prog["history"]), "split_dataset_ratio 0.2 gives eval"
    assert isinstance(prog["train_loss"], float) and isinstance(prog["train_runtime"], float), prog
    logged: dict[int, float] = {}
    for run in (first_run, second_run):
        for line in (run / "logging.jsonl").read_text().splitlines():
            d = json.loads(line)
            if "loss" in d and "global_step/max_steps" in d:
                logged[int(str(d["global_step/max_steps"]).split("/")[0])] = float(d["loss"])
    for pt in losses:
        assert pt["step"] in logged, (pt, logged)
        assert math.isclose(pt["loss"], logged[pt["step"]], rel_tol=1e-3), (pt, logged[pt["step"]])
    second = [json.loads(line) for line in (second_run / "logging.jsonl").read_text().splitlines()]
    first_step = int(str(second[0]["global_step/max_steps"]).split("/")[0])
    assert at < first_step <= at + 2, first_step  # the resumed run's first logged step follows the checkpoint
    cps = server.http.get(f"/jobs/{job_id}/checkpoints").json()
    saved = [c["step"] for c in cps["checkpoints"]]
    assert saved == sorted(saved) and saved[-1] == steps and at in saved and cps["checkpoints"][-1]["exported"], cps
    assert {c["attempt"] for c in cps["checkpoints"]} == {1, 2}, cps

    # The automatic export merged the last checkpoint into <checkpoint>-merged.
    export = job["export"]
    assert export["status"] == "completed", diagnose(server, job_id)
    assert export["checkpoint"] == str(last), export
    assert export["command"][:2] == [str(swift), "export"] and "--merge_lora" in export["command"], export
    merged = Path(export["path"])
    assert merged == Path(f"{last}-merged"), export
    assert (merged / "config.json").is_file(), os.listdir(merged)
    weights = list(merged.glob("*.safetensors"))
    assert weights and all(w.stat().st_size > 0 for w in weights), os.listdir(merged)
    assert json.loads((merged / "config.json").read_text()).get("model_type") == "qwen2"
    kinds = [e["type"] for e in server.http.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["events"]]
    assert "export_completed" in kinds, kinds


def test_real_swift_dpo_and_grpo_with_arguments_checked_against_the_installed_version(
    server_factory: Callable[..., ApiServer], lab: tuple[Path, Path, Path, str]
) -> None:
    """`kind: rlhf` (two jobs at once on one server: each real swift start costs seconds).

    DPO runs `swift rlhf --rlhf_type dpo` on a preference data set; arguments beyond the named fields
    (target_modules, beta, lr_scheduler_type) are checked against the real ms-swift's own argument list.
    GRPO runs on prompts with a built-in reward: what swift would refuse at its start (the generation batch its 8
    default generations do not divide, a reference model for LoRA) is a 422 at create; a batch that fits
    trains, with GRPO's trainer importable (msgspec, which ms-swift does not declare, is installed)."""
    swift, model, data, swift_version = lab
    server = real_server(server_factory, swift, data.parent)
    wait_for(lambda: (server.http.get("/health").json().get("swift") or {}).get("probed"), timeout=120, interval=0.5,
             what="the scheduler to read ms-swift's arguments")  # fmt: skip
    health = server.http.get("/health").json()["swift"]
    assert health["ok"] is True and health["version"] == swift_version, health

    # DPO: refused on a data set without preference pairs, and for a misspelt argument; then started.
    pref = data.parent / "pref.jsonl"
    training = {
        "model_type": "qwen2", "template": "qwen2_5", "max_steps": 4, "save_steps": 2, "logging_steps": 1,
        "gradient_accumulation_steps": 1, "max_length": 128, "lora_rank": 8, "lora_alpha": 16,
        "dataloader_num_workers": 0, "dataset_num_proc": 1, "split_dataset_ratio": 0,
        "target_modules": ["q_proj", "v_proj"], "beta": 0.2, "lr_scheduler_type": "linear",
    }  # fmt: skip
    wrong = server.create(data_path=str(data), model_path=str(model), output_dir="e2e_dpo", num_gpus=0,
                          kind="rlhf", training=training)  # fmt: skip
    assert wrong.status_code == 422 and "rejected_response" in wrong.json()["detail"], wrong.text
    typo = server.create(data_path=str(pref), model_path=str(model), output_dir="e2e_dpo", num_gpus=0, kind="rlhf",
                         training={**training, "lr_schedular_type": "linear"})  # fmt: skip
    assert typo.status_code == 422 and "did you mean lr_scheduler_type" in typo.json()["detail"], typo.text
    r = server.create(data_path=str(pref), model_path=str(model), output_dir="e2e_dpo", num_gpus=0, kind="rlhf",
                      rlhf_type="dpo", auto_start=True, training=training)  # fmt: skip
    assert r.status_code == 201, r.text
    dpo_id = r.json()["job_id"]

    # GRPO: refused where swift would refuse at its start; then a batch that fits.
    prompts = data.parent / "prompts.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    prompts.write_text("".join(json.dumps({"messages": r["messages"][:1]}) + "\n" for r in rows))
    grpo: dict[str, Any] = {
        "model_type": "qwen2", "template": "qwen2_5", "max_steps": 2, "save_steps": 2, "logging_steps": 1,
        "max_completion_length": 16, "reward_funcs": ["format"], "dataloader_num_workers": 0, "dataset_num_proc": 1,
        "split_dataset_ratio": 0,
    }  # fmt: skip
    body = {"data_path": str(prompts), "model_path": str(model), "output_dir": "e2e_grpo", "num_gpus": 0,
            "kind": "rlhf", "rlhf_type": "grpo"}  # fmt: skip
    wrong = server.create(**body, training=grpo)  # 1 x 1 x 4 steps: 4 completions, swift's 8 generations
    assert wrong.status_code == 422 and "set it to one of [2, 4]" in wrong.json()["detail"], wrong.text
    ref = server.create(**{**body, "rlhf_type": "dpo", "data_path": str(pref)}, training={"ref_model": str(model)})
    assert ref.status_code == 422 and "ref_model is only for a full fine-tune" in ref.json()["detail"], ref.text
    fits = {**grpo, "num_generations": 2, "gradient_accumulation_steps": 1, "batch_size": 2}
    r = server.create(**body, auto_start=True, training=fits)
    assert r.status_code == 201, r.text
    grpo_id = r.json()["job_id"]

    job = completed(server, dpo_id, "DPO")
    command = job["command"]
    assert command[:2] == [str(swift), "rlhf"] and command[command.index("--rlhf_type") + 1] == "dpo", command
    saved = json.loads((Path(job["run_dir"]) / "args.json").read_text())
    assert saved["rlhf_type"] == "dpo" and saved["beta"] == 0.2 and saved["lr_scheduler_type"] == "linear", saved
    assert sorted(saved["target_modules"]) == ["q_proj", "v_proj"], saved["target_modules"]
    assert job["progress"]["current_step"] == 4 and job["progress"]["max_steps"] == 4, job["progress"]
    history = server.http.get(f"/jobs/{dpo_id}/progress", params={"history_limit": 100}).json()["history"]
    assert [p["step"] for p in history if p.get("loss") is not None] == [1, 2, 3, 4], history
    assert job["last_checkpoint"] == str(Path(job["run_dir"]) / "checkpoint-4"), job["last_checkpoint"]

    job = completed(server, grpo_id, "GRPO")
    saved = json.loads((Path(job["run_dir"]) / "args.json").read_text())
    assert saved["rlhf_type"] == "grpo" and saved["num_generations"] == 2, saved
    assert job["progress"]["current_step"] == 2 and job["last_checkpoint"].endswith("checkpoint-2"), job
    history = server.http.get(f"/jobs/{grpo_id}/progress", params={"history_limit": 100}).json()["history"]
    assert [p["step"] for p in history if p.get("loss") is not None] == [1, 2], history


PARSE_EACH = r"""
import json, sys
from transformers import HfArgumentParser
import swift.arguments as A
try:
    from swift.utils.utils import _patch_get_type_hints as patch
except ImportError:
    import contextlib
    patch = contextlib.nullcontext
classes = {"sft": A.SftArguments, "pt": A.PretrainArguments, "rlhf": A.RLHFArguments}
parsers = {}
for kind, cls in classes.items():
    with patch():
        parsers[kind] = HfArgumentParser([cls])

class Refused(Exception):
    pass

def refuse(message):
    raise Refused(message)

failed = []
for kind, name, argv in json.load(open(sys.argv[1])):
    parser = parsers[kind]
    parser.error = refuse
    try:
        _, rest = parser.parse_known_args(argv)
        if rest:
            failed.append([kind, name, argv, f"left over: {rest}"])
    except (Refused, SystemExit, ValueError, TypeError) as exc:
        failed.append([kind, name, argv, str(exc)[:200]])
print(json.dumps(failed))
"""


def test_every_argument_value_the_server_accepts_parses_with_the_real_swift(
    lab: tuple[Path, Path, Path, str], tmp_path: Path
) -> None:
    """Each argument of sft, pt and rlhf, with values of its kind as the server checks them (the installed
    version's own probe): what the server accepts, swift's own parser takes; before, 8 fields passed the check
    and failed at swift's start, after the job's wait."""
    from application.exceptions import Invalid
    from application.services.swift_arguments import argv_of, check_arguments, fields_of
    from application.services.swift_info import SwiftInfo

    swift, *_ = lab
    python = python_of(swift)
    probe = subprocess.run([str(python), str(ROOT / "application" / "swift_probe.py")], capture_output=True,
                           text=True, timeout=BUILD_TIMEOUT, check=True)  # fmt: skip
    info = SwiftInfo.from_json(json.loads(probe.stdout))
    samples: dict[str, list[Any]] = {"bool": [True, False], "int": [3, -2], "float": [0.5, -1e-5],
                                     "str": ["abc"], "any": ["abc"], "dict": [{"a": 1}]}  # fmt: skip
    accepted = []
    for kind in ("sft", "pt", "rlhf"):
        for name, spec in fields_of(info, kind).items():
            values: list[Any] = list(spec.get("choices") or []) if spec["kind"] == "literal" else \
                [[v, v] for v in samples.get(spec.get("item", "str"), ["abc"])] if spec["kind"] == "list" else \
                samples.get(spec["kind"], [])  # fmt: skip
            for value in values:
                try:
                    accepted.append([kind, name, argv_of(check_arguments(kind, {name: value}, info))])
                except Invalid:
                    continue  # refused here: what swift would do with it does not matter
    assert len(accepted) > 500, len(accepted)
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps(accepted))
    out = subprocess.run([str(python), "-c", PARSE_EACH, str(cases)], capture_output=True, text=True,
                         timeout=BUILD_TIMEOUT, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    failed = json.loads(out.stdout.strip().splitlines()[-1])
    assert failed == [], json.dumps(failed, indent=1)[:4000]
