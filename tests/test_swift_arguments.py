"""Any ms-swift argument in `training`, checked against the argument lists of real ms-swift 4.6.0 and 3.5.3."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from application.exceptions import Invalid, Unavailable
from application.models.job_request import JobCreate, TrainingParams
from application.models.training_model import Job, JobStatus
from application.services.swift_arguments import argv_of, check_arguments, require_usable_swift
from application.services.swift_combinations import check_combinations, check_kind
from application.services.swift_command import SwiftVersion, build_sft_command, detect_swift_version
from application.services.swift_info import SwiftInfo
from tests.conftest import FAKE_SWIFT, ApiServer, fake_dataset, job_body, make_model, seed_swift_probe, wait_for

FIX = Path(__file__).parent / "fixtures" / "swift"
V4 = SwiftInfo.from_json(json.loads((FIX / "probe-4.6.0.json").read_text()))
V3 = SwiftInfo.from_json(json.loads((FIX / "ms-swift-3.5.3" / "probe-arguments-3.5.3.json").read_text()))


def refused(kind: str, extra: dict[str, Any], info: SwiftInfo | None = V4) -> str:
    with pytest.raises(Invalid) as exc:
        check_arguments(kind, extra, info)
    return exc.value.detail


def test_everyday_arguments_are_converted_to_what_the_cli_parses() -> None:
    got = check_arguments("sft", {
        "target_modules": ["q_proj", "v_proj"], "lr_scheduler_type": "linear", "seed": "7", "system": "Be brief.",
        "report_to": "tensorboard", "attn_impl": "sdpa", "quant_bits": "4", "freeze_vit": "false", "packing": True,
        "streaming": False, "deepspeed": "zero2", "model_kwargs": {"MAX_PIXELS": 1003520}, "weight_decay": 0,
        "max_grad_norm": 0.5, "bnb_4bit_quant_type": None,
    }, V4)  # fmt: skip
    assert got == {
        "target_modules": ["q_proj", "v_proj"], "lr_scheduler_type": "linear", "seed": 7, "system": "Be brief.",
        "report_to": ["tensorboard"], "attn_impl": "sdpa", "quant_bits": 4, "freeze_vit": False, "packing": True,
        "streaming": False, "deepspeed": "zero2", "model_kwargs": '{"MAX_PIXELS":1003520}', "weight_decay": 0.0,
        "max_grad_norm": 0.5,
    }  # fmt: skip
    assert argv_of(got)[:6] == ["--target_modules", "q_proj", "v_proj", "--lr_scheduler_type", "linear", "--seed"]
    assert argv_of({"packing": True, "deepspeed": '{"a":1}', "lr": 1e-05}) == [
        "--packing", "true", "--deepspeed", '{"a":1}', "--lr", "1e-05"]  # fmt: skip
    # Inside a JSON object only paths out of the job's folder are refused: stop strings, file names, hub ids
    # and folders inside it pass (escaped by the JSON encoding).
    free = {"stop": ["\n\n", "\u202e"], "tokenizer_file": "tokenizer.json", "out": "./runs/tb", "repo": "org/model"}
    assert json.loads(check_arguments("sft", {"lr_scheduler_kwargs": free}, V4)["lr_scheduler_kwargs"]) == free


def test_unknown_names_get_the_closest_real_ones() -> None:
    assert "did you mean target_modules" in refused("sft", {"target_module": ["all-linear"]})
    assert "not an argument of `swift sft` in ms-swift 4.6.0" in refused("sft", {"no_such_thing": 1})
    long = refused("sft", {"x" * 10_000: 1})  # (it came back whole: hunt AO)
    assert long.startswith(f"training.{'x' * 64}... (10000 characters) is not an argument") and len(long) < 300
    # An argument of another kind of training says which kind has it.
    assert "`swift rlhf`" in refused("sft", {"beta": 0.1}) and "kind 'rlhf'" in refused("sft", {"beta": 0.1})
    assert check_arguments("rlhf", {"beta": 0.1}, V4) == {"beta": 0.1}


@pytest.mark.parametrize(("name", "value", "says"), [
    ("output_dir", "/tmp/x", "set the job's output_dir"),
    ("resume_from_checkpoint", "x/checkpoint-1", "/resume"),
    ("add_version", False, "v<N>"),
    ("hub_token", "secret", "secret"),
    ("swanlab_token", "secret", "secret"),
    ("local_repo_path", "/srv/repo", "anywhere on the server"),
    ("custom_register_path", ["evil.py"], "runs Python files"),
    ("external_plugins", ["plugin.py"], "runs Python files"),
    # An args.json in a model folder set the data set (another owner's upload) and external_plugins, unchecked.
    ("load_args", True, "args.json in the model or adapter folder"),
    ("load_data_args", True, "args.json in the model or adapter folder"),
    ("rlhf_type", "dpo", "rlhf_type"),
    ("push_to_hub", True, "server's own hub token"),
    # trackio deploys a Hugging Face Space with the server's HF_TOKEN (hunt BG).
    ("trackio_space_id", "someone/space", "server's own HF_TOKEN"),
    ("trackio_static_space_id", "someone/static", "server's own HF_TOKEN"),
    # Addresses the run would connect to from the server's network.
    ("swanlab_webhook_url", "http://10.0.0.1/hook", "from the server's network"),
    ("vllm_server_base_url", ["http://169.254.169.254"], "from the server's network"),
    ("vllm_server_host", ["10.0.0.2"], "from the server's network"),
    ("swanlab_smtp_server", "10.0.0.3", "from the server's network"),
    ("teacher_model_server", "http://10.0.0.4", "from the server's network"),
])  # fmt: skip
def test_managed_and_code_loading_arguments_are_refused_with_the_reason(name: str, value: Any, says: str) -> None:
    message = refused("sft", {name: value})
    assert "managed by the server" in message and says in message


def test_report_to_integrations_that_publish_with_the_servers_token_are_refused() -> None:
    for value in (["trackio"], ["tensorboard", "TrackIO"], "all", ["all"]):
        message = refused("sft", {"report_to": value})
        assert "is refused" in message and "HF_TOKEN" in message and "report to tensorboard" in message, message
    for value in (["tensorboard"], ["wandb", "tensorboard"], ["none"], "swanlab"):
        assert "report_to" in check_arguments("sft", {"report_to": value}, V4)


@pytest.mark.parametrize(("extra", "says"), [
    ({"seed": "abc"}, "whole number"),
    ({"seed": True}, "whole number"),
    ({"learning_rate_x": 1}, "did you mean learning_rate"),
    ({"xyz_abc": 1}, "not an argument"),
    ({"quant_bits": 5}, "one of 1, 2, 3, 4, 8, float8"),
    # transformers converts these with its Enum after the job's wait, although swift annotates them as text.
    ({"lr_scheduler_type": "cosine_warmup"}, "must be one of linear, cosine, cosine_with_restarts"),
    ({"lr_scheduler_type": "cosine_min_lr"}, "did you mean cosine_with_min_lr"),
    ({"optim": "adamw"}, "training.optim must be one of adamw_torch, adamw_torch_fused"),
    ({"save_strategy": "step"}, "must be one of no, steps, epoch, best: did you mean steps?"),
    ({"packing": "yes"}, "true or false"),
    ({"target_modules": []}, "at least one item"),
    ({"deepspeed": "/etc/ds.json"}, "JSON object or one of zero0"),
    ({"device_map": "/etc/map.json"}, "JSON object or one of auto, balanced"),
    ({"model_kwargs": "not json"}, "JSON object"),
    ({"attn_impl": "/etc/passwd"}, "looks like a file path"),
    ({"attn_impl": "x.json"}, "looks like a file path"),
    ({"system": "prompt.txt"}, "ends in .txt"),
    ({"attn_impl": ".."}, "looks like a file path"),
    ({"attn_impl": "shared/.."}, "looks like a file path"),
    ({"attn_impl": "./x"}, "looks like a file path"),
    ({"system": "line\x1b[31m"}, "control"),
    ({"attn_impl": "--output_dir"}, "must not start with '-'"),
    ({"attn_impl": ["a", "b"]}, "one value"),
    ({"weight_decay": float("inf")}, "finite number"),
    ({"weight_decay": 10**400}, "finite number"),  # math.isfinite raised OverflowError: a 500
    ({"seed": 10**19}, "at most 19 digits"),
    ({"weight_decay": "-Infinity"}, "finite number"),
    ({"max_grad_norm": float("nan")}, "finite number"),
    ({"lr_scheduler_kwargs": {"a": float("nan")}}, "training.lr_scheduler_kwargs.a takes a finite number"),
    # What a JSON object holds reaches swift too: a DeepSpeed offload or monitor path, a cache folder.
    ({"deepspeed": {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/etc/x"}}}},
     "training.deepspeed.zero_optimization.offload_param.nvme_path is a path that leaves"),
    ({"deepspeed": {"tensorboard": {"enabled": True, "output_path": "runs/../../x"}}}, "is a path that leaves"),
    ({"lr_scheduler_kwargs": {"cache_dir": "~/cache"}}, "training.lr_scheduler_kwargs.cache_dir is a path that"),
    ({"lr_scheduler_kwargs": '{"paths": ["ok", "/srv/other"]}'}, "lr_scheduler_kwargs.paths[1] is a path that"),
    ({"lr_scheduler_kwargs": {"paths": "runs:/srv/other"}}, "lr_scheduler_kwargs.paths is a path that leaves"),
    # Through fsspec, tensorboard wrote anywhere (file://) and PUT to any host (webhdfs://): a hunt.
    ({"deepspeed": {"tensorboard": {"output_path": "file:///tmp/x"}}}, "tensorboard.output_path is a URL"),
    ({"model_revision": "webhdfs://10.0.0.5:9870/tb"}, "training.model_revision is a URL"),
    # ms-swift sets model_kwargs as environment variables of the run: only a model's own options are taken.
    # BROWSER and MPLBACKEND ran a shell command as training ended; TENSORBOARD_LOGGING_DIR wrote anywhere (a hunt).
    ({"model_kwargs": {"BROWSER": "sh -c 'id > /tmp/x' %s", "MPLBACKEND": "module://antigravity"}},
     "training.model_kwargs.BROWSER: ms-swift sets each item as an environment variable of the run, and only"),
    ({"model_kwargs": {"TENSORBOARD_LOGGING_DIR": "runs"}}, "only a model's own options are taken"),
    ({"model_kwargs": {"HTTPS_PROXY": "http://10.1.2.3:3128"}}, "only a model's own options are taken"),
    ({"model_kwargs": {"hf_endpoint": "x"}}, "only a model's own options are taken"),
    ({"model_kwargs": {"SWIFT_ALLOW_INTERNAL_URL": "true"}}, "only a model's own options are taken"),
    ({"model_kwargs": {"max_pixel": 1}}, "did you mean MAX_PIXELS"),
    ({"model_kwargs": {"A=B": "1"}}, "only a model's own options are taken"),
    ({"model_kwargs": {"FPS": [1, 2]}}, "training.model_kwargs.FPS is set as an environment variable"),
    ({"model_kwargs": {"FPS": None}}, "leave it out for the model's default"),  # ("None" failed the run)
    ({"model_kwargs": {"MAX_PIXELS": "a\x00b"}}, "training.model_kwargs.MAX_PIXELS is set as an environment"),
])  # fmt: skip
def test_bad_values_are_refused_saying_what_to_change(extra: dict[str, Any], says: str) -> None:
    assert says in refused("sft", extra)


def test_arguments_swift_parses_as_json_though_declared_text_are_checked_as_objects() -> None:
    # ms-swift reads teacher_deepspeed, fsdp and rope_scaling with json_parse_to_dict: a JSON text (or text it
    # "repairs" into an object) reached DeepSpeed unchecked, its nvme_path anywhere on the server's disk.
    nvme = {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/etc/cron.d"}}}
    for value in (nvme, json.dumps(nvme)):
        says = refused("rlhf", {"teacher_deepspeed": value})
        assert "training.teacher_deepspeed.zero_optimization.offload_param.nvme_path is a path that leaves" in says
    assert "JSON object or one of zero0" in refused("rlhf", {"teacher_deepspeed": "{zero_optimization: {}}"})
    assert "JSON object or one of fsdp2" in refused("sft", {"fsdp": "full_shard auto_wrap"})
    got = check_arguments("rlhf", {"teacher_deepspeed": "zero3", "fsdp": {"fsdp": "full_shard"},
                                   "rope_scaling": "yarn"}, V4)  # fmt: skip
    assert got == {"teacher_deepspeed": "zero3", "fsdp": '{"fsdp":"full_shard"}', "rope_scaling": "yarn"}


def test_negative_numbers_with_an_exponent_reach_swift_as_values_not_options() -> None:
    # argparse takes "-1e-05" for an option ("expected one argument"): the run failed after its wait.
    got = check_arguments("rlhf", {"beta": -1e-05, "reward_weights": [1.0, -1e-05, -2e16]}, V4)
    argv = argv_of(got)
    assert argv == ["--beta", "-0.00001", "--reward_weights", "1.0", "-0.00001", "-20000000000000000"]
    assert [float(v) for v in argv[3:]] == [1.0, -1e-05, -2e16]


def test_a_prompt_may_start_with_a_dash_and_only_a_system_prompt_is_a_file_to_swift() -> None:
    # A Markdown list as the system prompt was refused ("swift would read it as an option"): sent as
    # --system=value, argparse reads it whole. Only `system` is read from a file by ms-swift: a stop word or a
    # response prefix ending in .txt was refused for that too.
    text = {"system": "- Be brief.\n- Be kind.", "response_prefix": "---", "stop_words": ["see notes.txt"]}
    got = check_arguments("sft", text, V4)
    assert got == text
    assert argv_of(got) == ["--system=- Be brief.\n- Be kind.", "--response_prefix=---", "--stop_words",
                            "see notes.txt"]  # fmt: skip
    assert "must not start with '-'" in refused("sft", {"stop_words": ["---"]})  # (one of a list: an option)
    # A literal's choices are not booleans: true was taken as 1 (True == 1), 1-bit quantization.
    assert "must be one of 1, 2, 3, 4, 8" in refused("sft", {"quant_bits": True})
    assert check_arguments("sft", {"quant_bits": 4}, V4) == {"quant_bits": 4}
    # DeepSpeed and FSDP together: ms-swift refuses them as the run starts.
    both = check_arguments("sft", {"deepspeed": "zero2", "fsdp": "fsdp2"}, V4)
    with pytest.raises(Invalid, match=r"deepspeed and training\.fsdp cannot be used together"):
        check_combinations(None, both)
    check_combinations(None, check_arguments("sft", {"deepspeed": "zero2"}, V4))


@pytest.mark.parametrize(("extra", "rlhf_type", "says"), [
    # The README's QLoRA example had no quant_method: ms-swift then loads the model unquantized, silently.
    ({"quant_bits": 4, "bnb_4bit_quant_type": "nf4"}, None, "does nothing without training.quant_method"),
    ({"quant_method": "bnb", "quant_bits": 3}, None, "does not work with quant_method bnb"),
    ({"quant_method": "bnb"}, None, "needs training.quant_bits (4, 8)"),
    ({"quant_method": "quanto", "quant_bits": 1}, None, "use 2, 4, 8, float8"),
    ({"quant_method": "eetq", "quant_bits": 4}, None, "use 8"),
    ({"cached_dataset": ["/x/train"], "num_generations": 2}, "grpo", "not supported for GRPO"),
    ({"cached_dataset": ["/x/train"], "streaming": True}, None, "streaming does not work with a cached data set"),
    # swift built PPO's value model from a reward model that was not there: an AttributeError after the wait.
    ({}, "ppo", "rlhf_type 'ppo' needs training.reward_model"),
    # ms-swift asserted these as the run started (hunt DH, the real swift).
    ({"loss_type": ["kto", "apo_zero_unpaired"]}, "kto", "several training.loss_type values are for rlhf_type 'dpo'"),
    ({"loss_type": ["sigmoid"], "loss_weights": [1.0]}, "orpo", "training.loss_weights is for rlhf_type 'dpo' only"),
    ({"loss_type": ["sigmoid", "bco_pair"], "loss_weights": [1.0]}, "dpo", "has 1 weight(s) for 2 loss type(s)"),
])  # fmt: skip
def test_arguments_ms_swift_refuses_together_are_refused_at_create(extra: dict[str, Any], rlhf_type: str | None,
                                                                    says: str) -> None:  # fmt: skip
    with pytest.raises(Invalid, match=re.escape(says)):
        check_combinations(rlhf_type, extra)
    for fine in ({"quant_method": "bnb", "quant_bits": 4}, {"quant_method": "fp8"}, {"quant_method": "hqq",
                 "quant_bits": 3}, {"cached_dataset": ["/x/train"]}):  # fmt: skip
        check_combinations(None, fine)
    check_combinations("ppo", {"reward_model": ["Qwen/Qwen2.5-0.5B-Instruct"]})
    check_combinations("dpo", {"loss_type": ["sigmoid", "bco_pair"], "loss_weights": [0.8, 0.2]})
    check_combinations("kto", {"loss_type": ["kto"]})
    check_combinations(None, {"loss_type": ["infonce", "x"], "loss_weights": [1.0]})  # (sft: not these rules)


def test_a_models_own_options_pass_as_model_kwargs() -> None:
    assert check_arguments("sft", {"model_kwargs": {"MAX_PIXELS": 1003520, "fps": 2}}, V4) == {
        "model_kwargs": '{"MAX_PIXELS":1003520,"fps":2}'}  # fmt: skip
    # The embedding and reranker losses read their settings from the environment only (a review).
    losses = {"INFONCE_TEMPERATURE": 0.05, "INFONCE_USE_BATCH": True, "LISTWISE_RERANKER_TEMPERATURE": 0.5}
    assert json.loads(check_arguments("sft", {"model_kwargs": losses}, V4)["model_kwargs"]) == losses


def test_prompts_and_stop_strings_keep_their_line_breaks_and_may_start_with_a_slash() -> None:
    text = {"system": "You are a bot.\nAnswer briefly.", "stop_words": ["</s>", "\n"],
            "response_prefix": "/no_think\t"}  # fmt: skip
    assert check_arguments("sft", text, V4) == text
    # A device map is an object, or one of the words transformers knows ("auto" was refused).
    assert check_arguments("sft", {"device_map": "auto"}, V4) == {"device_map": "auto"}
    # A list of literals whose choices the argument list does not carry ("must be one of " and nothing).
    assert check_arguments("sft", {"debug": "underflow_overflow"}, V4) == {"debug": ["underflow_overflow"]}
    assert "ends in .txt" in refused("sft", {"system": "/etc/prompt.txt"})  # swift reads that file
    assert "control or bidirectional" in refused("sft", {"system": "a\x1b[31m"})
    # Bidi marks too (only embeddings and isolates were refused), and zero-width characters in names; free text
    # keeps the joiners its scripts use.
    for mark in ("\u200f", "\u200e", "\u061c"):
        assert "control or bidirectional" in refused("sft", {"system": f"be nice{mark}"})
        assert "control or bidirectional" in refused("sft", {"run_name": f"a{mark}b"})
    assert "control or bidirectional" in refused("sft", {"run_name": "a\u200bb"})
    assert check_arguments("sft", {"system": "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"}, V4)
    assert "looks like a file path" in refused("sft", {"attn_impl": "/etc/x"})  # elsewhere as before


def test_without_the_argument_list_only_named_fields_can_be_set() -> None:
    assert check_arguments("sft", {}, None) == {}
    assert "could not read the argument list" in refused("sft", {"seed": 1}, None)
    # A typo of a named field is named as such with or without the list.
    assert "unknown field: did you mean lora_rank?" in refused("sft", {"lora_rnk": 8}, None)
    assert "unknown field: did you mean lora_rank?" in refused("sft", {"lora_rnk": 8}, V4)
    with pytest.raises(Unavailable, match="try again shortly") as exc:
        check_arguments("sft", {"seed": 1}, None, pending=True)
    assert exc.value.headers == {"Retry-After": "5"}
    # Real arguments that resemble a named field or a job's were refused before the list was read, where a retry
    # then would have been taken (review EQ).
    for name in ("max_epochs", "model_author", "lora_rnk"):
        with pytest.raises(Unavailable, match="try again shortly"):
            check_arguments("sft", {name: 1}, None, pending=True)
    assert check_arguments("sft", {"max_epochs": 2, "model_author": "me"}, V4) == {
        "max_epochs": 2,
        "model_author": ["me"],
    }
    assert "could not read the argument list" in refused("sft", {"model_author": "me"}, None)


@pytest.mark.parametrize(("name", "hint"), [
    ("lr", "did you mean learning_rate?"), ("epochs", "did you mean num_epochs?"),
    ("LR", "did you mean learning_rate?"),
    ("priorty", "priority is a field of the job, not of its training: set it beside `training`, not inside it"),
    ("num_gpu", "num_gpus is a field of the job, not of its training"),
    ("auto_start", "auto_start is a field of the job"),
])  # fmt: skip
@pytest.mark.parametrize("info", [V4, None])
def test_a_name_another_trainer_uses_or_a_field_of_the_job_is_named_as_what_it_means(
    name: str, hint: str, info: SwiftInfo | None
) -> None:
    # `training.lr` said only that it was no argument of swift; `--set epochs=2` suggested max_epochs, and
    # `--set priorty=2` nothing (hunt EO).
    expected = f"training.{name}: unknown field: {hint}"
    if info is None and name in ("priorty", "num_gpu"):
        # (a name that only resembles a job field's may be an argument of swift's, which a list unread cannot tell)
        expected = f"training.{name}: the server could not read the argument list"
    assert expected in refused("sft", {name: 1}, info)


def test_a_fraction_out_of_its_bounds_is_refused_before_the_run() -> None:
    # lora_dropout 1.5 was taken, and the run failed once started: "dropout probability has to be between 0 and 1"
    # (hunt ES).
    assert refused("sft", {"lora_dropout": 1.5}) == "training.lora_dropout is 1.5: it takes a value from 0 to 1"
    assert refused("sft", {"adam_beta2": 1}) == (
        "training.adam_beta2 is 1: it takes a value from 0 up to, not including, 1"
    )
    assert "from 0 to 1" in refused("sft", {"lora_dropout": -0.1})
    assert check_arguments("sft", {"lora_dropout": 1, "adam_beta2": 0.999, "lora_alpha": 32}, V4) == {
        "lora_dropout": 1.0, "adam_beta2": 0.999, "lora_alpha": 32}  # fmt: skip


def test_the_3x_line_is_checked_against_its_own_list() -> None:
    assert check_arguments("sft", {"target_modules": "all-linear", "deepspeed": "zero3"}, V3) == {
        "target_modules": ["all-linear"], "deepspeed": "zero3"}  # fmt: skip
    new_in_4 = sorted(set(V4.arguments["SftArguments"]) - set(V3.arguments["TrainArguments"]) - {"tuner_type"})
    assert "ms-swift 3.5.3" in refused("sft", {new_in_4[0]: None}, V3)


def test_fsdp_turns_the_save_only_model_default_off_which_swift_refuses_beside_its_sharded_state() -> None:
    # ms-swift 4.6.0 failed every fsdp2 job after its wait: "FSDP2 with SHARDED_STATE_DICT is not compatible with
    # save_only_model=True", this server's default.
    def create(training: dict[str, Any]) -> JobCreate:
        return JobCreate.model_validate({"data_path": "d/x", "model_path": "m/x", "output_dir": "o", "num_gpus": 2,
                                         "training": training})  # fmt: skip

    assert create({"fsdp": "fsdp2"}).training.save_only_model is False
    assert (
        create({"fsdp": {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2}}}).training.save_only_model is False
    )
    assert create({"fsdp": "fsdp2", "save_only_model": False}).training.save_only_model is False
    with pytest.raises(ValidationError, match="leave save_only_model out"):
        create({"fsdp": "fsdp2", "save_only_model": True})
    # A full state dict takes it; without fsdp the default stands.
    full = {"fsdp": "full_shard", "fsdp_config": {"state_dict_type": "FULL_STATE_DICT"}}
    assert create({"fsdp": json.dumps(full), "save_only_model": True}).training.save_only_model is True
    assert create({"fsdp": full}).training.save_only_model is True
    assert create({}).training.save_only_model is True


def test_old_and_swift_names_are_aliases_of_the_named_fields() -> None:
    t = TrainingParams.model_validate({"lora_target_modules": ["q_proj"], "num_train_epochs": 2, "tuner_type": "full",
                                       "per_device_train_batch_size": 4})  # fmt: skip
    assert (t.num_epochs, t.batch_size, t.train_type) == (2, 4, "full")
    assert t.extra_arguments == {"target_modules": ["q_proj"]}
    with pytest.raises(ValidationError, match="same argument"):
        TrainingParams.model_validate({"num_train_epochs": 2, "num_epochs": 3})
    # Every tuner ms-swift 4.6.0 supports (get_supported_tuners): adapter and bone were refused.
    for tuner in ("adapter", "bone", "ia3", "lora_llm", "reft"):
        assert TrainingParams.model_validate({"tuner_type": tuner}).train_type == tuner


def test_warmup_steps_replace_the_default_warmup_ratio_which_swift_refuses_beside_them() -> None:
    def argv_for(training: dict[str, Any]) -> list[str]:
        t = JobCreate.model_validate({"data_path": "d/x", "model_path": "m/x", "output_dir": "o",
                                      "training": training}).training  # fmt: skip
        t = TrainingParams.model_validate({**t.model_dump(include=set(TrainingParams.model_fields)),
                                           **check_arguments("sft", t.extra_arguments, V4)})  # fmt: skip
        job = Job(job_id="j", status=JobStatus.PENDING, priority=5, data_path="d/x", model_path="m/x",
                  output_dir="/o", output_dir_requested="o", num_gpus=1, training=t, created_at=0,
                  updated_at=0)  # fmt: skip
        return build_sft_command("swift", job, SwiftVersion("4.6.0", "setting"))

    # ms-swift 4.6.0 fails with "`warmup_ratio` and `warmup_steps` cannot be set at the same time".
    argv = argv_for({"warmup_steps": 2})
    assert argv[argv.index("--warmup_steps") + 1] == "2" and argv[argv.index("--warmup_ratio") + 1] == "0.0"
    assert argv_for({})[argv_for({}).index("--warmup_ratio") + 1] == "0.05"
    # A fraction of an epoch, as swift takes it (an integer stays one: "1", not "1.0").
    for epochs, shown in ((1.5, "1.5"), (0.25, "0.25"), (2, "2")):
        argv = argv_for({"num_epochs": epochs})
        assert argv[argv.index("--num_train_epochs") + 1] == shown
    with pytest.raises(ValidationError, match="greater than 0"):
        TrainingParams.model_validate({"num_epochs": 0})

    def create(training: dict[str, Any]) -> JobCreate:
        return JobCreate.model_validate({"data_path": "d/x", "model_path": "m/x", "output_dir": "o",
                                         "training": training})  # fmt: skip

    with pytest.raises(ValidationError, match="set one of them"):
        create({"warmup_steps": 2, "warmup_ratio": 0.1})
    with pytest.raises(ValidationError, match="less than 1"):  # "warmup_ratio: 1.0 must be less than 1"
        create({"warmup_ratio": 1})
    assert create({"warmup_steps": None}).training.warmup_ratio == 0.05  # (null: swift's default, left out)
    # A job stored before these rules still reads (its record had both, or a ratio of 1).
    for stored in ({"warmup_steps": 10, "warmup_ratio": 0.05}, {"warmup_ratio": 1.0}):
        assert TrainingParams.model_validate_json(json.dumps({**TrainingParams().model_dump(), **stored}))


def test_kto_needs_a_total_batch_of_two_or_more() -> None:
    from application.services.swift_combinations import check_kto_batch

    with pytest.raises(Invalid, match="total batch of 2 or more"):
        check_kto_batch(1, 1, 0, {})  # ms-swift: "Batch size is 1 (too small). KTO will not work properly"
    check_kto_batch(1, 4, 0, {})  # the default gradient_accumulation_steps
    check_kto_batch(1, 1, 2, {})
    check_kto_batch(1, 1, 0, check_arguments("rlhf", {"loss_type": "apo_zero_unpaired"}, V4))  # (as a list)


def test_arguments_are_checked_as_swifts_own_parser_takes_them_not_as_annotated() -> None:
    # Each of these passed the check from the annotations and failed at swift's start, after the job's wait
    # (probe-4.6.0.json reads the parser ms-swift builds: its choices, nargs and type functions).
    refused = {
        "liger_kernel_config": ({"rope": True}, "cannot be given on ms-swift's command line"),  # a dict
        "parallelism_config": ("dp", "cannot be given on ms-swift's command line"),  # a config class
        "log_level": ("verbose", "must be one of detail, debug"),
        "train_sampling_strategy": ("shuffle", "must be one of random, sequential"),
        "optim_target_modules": (["attn", "mlp"], "takes one value, not a list"),  # nargs=None
        "include_num_input_tokens_seen": ("non_padding", "true or false"),  # parsed as a bool
        "debug": (["underflow_overflow", "x"], "must be one of underflow_overflow, tpu_metrics_debug"),
    }
    for name, (value, said) in refused.items():
        with pytest.raises(Invalid) as exc:
            check_arguments("sft", {name: value}, V4)
        assert f"training.{name}" in exc.value.detail and said in exc.value.detail, (name, exc.value.detail)
    fine = check_arguments("sft", {"log_level": "info", "optim_target_modules": "attn", "debug": ["underflow_overflow"],
                                   "include_num_input_tokens_seen": True}, V4)  # fmt: skip
    assert argv_of(fine) == ["--log_level", "info", "--optim_target_modules", "attn", "--debug", "underflow_overflow",
                             "--include_num_input_tokens_seen", "true"]  # fmt: skip


def test_grpo_generation_batch_must_divide_into_its_generations() -> None:
    from application.services.swift_combinations import check_grpo_batch

    # The defaults (1 x 1 process x 4 steps) and swift's 8 generations: ms-swift says "generation_batch_size (4)
    # must be evenly divisible by num_generations (8). Valid values: [2, 4]."
    with pytest.raises(Invalid, match=r"divisible by training.num_generations \(ms-swift's default is 8\): set it "
                                      r"to one of \[2, 4\]"):  # fmt: skip
        check_grpo_batch(1, 4, 0, {})
    check_grpo_batch(1, 4, 0, {"num_generations": 4})
    check_grpo_batch(2, 4, 1, {})  # 8
    check_grpo_batch(1, 4, 2, {"num_generations": 8})  # 2 processes x 4 steps
    with pytest.raises(Invalid, match=r"divisible by training\.num_generations: set it to one of"):
        check_grpo_batch(1, 1, 0, {"num_generations": 2, "steps_per_generation": 3})
    check_grpo_batch(1, 4, 0, {"generation_batch_size": 8})
    # The batch is the request's number: the suggestions were every divisor up to it, found on the event loop (a
    # create with 2 x 10^8 held the API worker 14 s; this one, for ever).
    with pytest.raises(Invalid, match=r"set it to one of \[2, 4, 8, 16, .*\]"):
        check_grpo_batch(1, 4, 0, {"generation_batch_size": 2**62, "num_generations": 7})
    with pytest.raises(Invalid, match="make the batch a multiple of it"):
        check_grpo_batch(1, 4, 0, {"generation_batch_size": 2_147_483_647, "num_generations": 7})  # (a prime)
    check_grpo_batch(1, 4, 0, {"generation_batch_size": 8})
    with pytest.raises(Invalid, match="multiple of batch_size x GPUs"):
        check_grpo_batch(2, 1, 1, {"generation_batch_size": 9, "num_generations": 3})
    with pytest.raises(Invalid, match=r"must equal batch_size x GPUs x steps_per_generation \(2\)"):
        check_grpo_batch(1, 4, 0, {"generation_batch_size": 8, "steps_per_generation": 2, "num_generations": 2})
    # Evaluating: ms-swift says "The global eval batch size (1 x 1) must be evenly divisible by
    # num_generations_eval (2)".
    with pytest.raises(Invalid, match="eval batch"):
        check_grpo_batch(1, 4, 0, {"num_generations": 2}, split_ratio=0.1)
    with pytest.raises(Invalid, match="eval batch"):
        check_grpo_batch(1, 4, 0, {"num_generations": 2, "val_dataset": ["v.jsonl"]})
    check_grpo_batch(1, 4, 0, {"num_generations": 2, "per_device_eval_batch_size": 2}, split_ratio=0.1)
    check_grpo_batch(1, 4, 0, {"num_generations": 2, "num_generations_eval": 1}, split_ratio=0.1)
    check_grpo_batch(1, 4, 0, {"num_generations": 2, "eval_strategy": "no"}, split_ratio=0.1)


def test_a_reference_model_only_for_a_full_fine_tune_that_uses_one() -> None:
    from application.services.swift_combinations import check_ref_model

    for rlhf_type, train_type in (("dpo", "lora"), ("kto", "lora"), ("orpo", "full"), ("simpo", "full")):
        with pytest.raises(Invalid, match=r"training\.ref_model is only for a full fine-tune"):
            check_ref_model(rlhf_type, train_type, {"ref_model": "m/ref"})
    check_ref_model("dpo", "full", {"ref_model": "m/ref"})
    check_ref_model("grpo", "lora", {"ref_model": "m/ref", "beta": 0.0})  # swift drops it
    check_ref_model("dpo", "lora", {})


def test_packing_needs_flash_attention_and_a_preference_type_that_packs() -> None:
    # ms-swift 4.6.0 (SftArguments._check_padding_free): 'The "packing" feature requires a flash attention
    # implementation', raised as the run starts; such jobs were accepted and failed after their wait.
    from application.services.swift_combinations import check_packing

    with pytest.raises(Invalid, match=r"training\.packing needs a flash attention implementation in ms-swift 4\.6\.0: "
                                      r"set training\.attn_impl to one of flash_attn"):  # fmt: skip
        check_packing("sft", None, {"packing": True, "attn_impl": "sdpa"}, 1, V4)
    with pytest.raises(Invalid, match=r"training\.padding_free .* needs a GPU: leave it out of a job with num_gpus 0"):
        check_packing("pt", None, {"padding_free": True}, 0, V4)
    with pytest.raises(Invalid, match=r"needs a GPU"):  # (flash-attn named or not)
        check_packing("sft", None, {"packing": True, "attn_impl": "flash_attn"}, 0, V4)
    with pytest.raises(Invalid, match=r"does not work with rlhf_type 'orpo' .* \(only with grpo, dpo, kto, gkd\)"):
        check_packing("rlhf", "orpo", {"packing": True, "attn_impl": "flash_attn"}, 2, V4)
    check_packing("rlhf", "dpo", {"packing": True, "attn_impl": "flash_attention_2"}, 2, V4)
    check_packing("sft", None, {"packing": False, "padding_free": False}, 0, V4)
    check_packing("sft", None, {"attn_impl": "sdpa"}, 0, V4)
    check_packing("sft", None, {"packing": True}, 0, V3)  # (3.x releases differ: swift says)
    check_packing("sft", None, {"packing": True}, 0, None)


def test_kinds_build_their_own_command_with_the_extra_arguments() -> None:
    req = JobCreate.model_validate(
        {
            "data_path": "d/x",
            "model_path": "m/x",
            "output_dir": "o",
            "kind": "rlhf",
            "training": {"target_modules": ["q_proj"], "dataset": ["more/data"], "beta": 0.2},
        }
    )
    assert req.rlhf_type == "dpo"
    training = TrainingParams.model_validate({**req.training.model_dump(include=set(TrainingParams.model_fields)),
                                              **check_arguments("rlhf", req.training.extra_arguments, V4)})  # fmt: skip
    job = Job(job_id="j", status=JobStatus.PENDING, priority=5, data_path="d/x", model_path="m/x", output_dir="/o",
              output_dir_requested="o", num_gpus=1, kind="rlhf", rlhf_type="dpo", training=training, created_at=0,
              updated_at=0)  # fmt: skip
    argv = build_sft_command("swift", job, SwiftVersion("4.6.0", "setting"))
    assert argv[:6] == ["swift", "rlhf", "--model", "m/x", "--dataset", "d/x"] and argv[6] == "more/data"
    assert argv[argv.index("--rlhf_type") + 1] == "dpo" and "--tuner_type" in argv
    assert argv[-4:] == ["--target_modules", "q_proj", "--beta", "0.2"]
    assert build_sft_command("swift", job, SwiftVersion("3.5.3", "setting")).count("--train_type") == 1
    with pytest.raises(ValidationError, match="rlhf_type is for kind 'rlhf'"):
        JobCreate(data_path="d/x", model_path="m/x", output_dir="o", rlhf_type="dpo")
    check_kind("rlhf", "kto", V4)
    with pytest.raises(Invalid, match=r"not one of ms-swift 4\.6\.0's"):
        check_kind("rlhf", "dpoo", V4)


def test_streaming_without_max_steps_is_refused_at_create() -> None:
    # A streamed data set has no length: swift refused to start ("max_steps has to be specified"), after the job's
    # wait (hunt DH, the real swift).
    from application.services.preflight import check_swift_request

    def req(training: dict[str, Any]) -> JobCreate:
        return JobCreate(data_path="d/x", model_path="m/x", output_dir="o", training=TrainingParams(**training))

    streamed = req({"streaming": True})
    with pytest.raises(Invalid, match=r"training\.streaming needs training\.max_steps"):
        check_swift_request(streamed, streamed.training.extra_arguments, V4, pending=False)
    for fine in (req({"streaming": True, "max_steps": 10}), req({"streaming": False})):
        check_swift_request(fine, fine.training.extra_arguments, V4, pending=False)


def test_a_swift_that_cannot_run_refuses_creates_with_503() -> None:
    require_usable_swift(None)  # not known yet: the runner will tell
    require_usable_swift({"found": True})
    with pytest.raises(Unavailable, match="SWIFT_BIN=/nope was not found"):
        require_usable_swift({"found": False, "reason": "SWIFT_BIN=/nope was not found"})


# ---- over HTTP: a server whose (fake) swift has the argument list of real ms-swift 4.6.0 ---------------------


def test_a_wrapper_script_as_swift_bin_is_said_to_be_one(server_factory: Callable[..., ApiServer],
                                                          tmp_path: Path) -> None:  # fmt: skip
    # A /bin/sh wrapper around swift: its shell was handed the probe (a Python file) and /health said only that
    # the arguments "could not be read with SWIFT_BIN's Python"; the log, a shell's "Syntax error".
    wrapper = tmp_path / "swift-wrapper"
    wrapper.write_text(f'#!/bin/sh\nexec "{FAKE_SWIFT}" "$@"\n')
    wrapper.chmod(0o755)
    server = server_factory(env={"SWIFT_BIN": str(wrapper), "SWIFT_VERSION": "4.6.0"})
    swift = wait_for(lambda: (s := server.http.get("/health").json()["swift"])["detail"] and s, what="the probe")
    assert swift["ok"] is True and swift["probed"] is False, swift
    assert "is not ms-swift's console script" in swift["detail"] and "wrapper" in swift["detail"], swift
    # It runs all the same: jobs are swift's.
    assert server.create(**job_body(tmp_path, "wrapped", auto_start=True)).status_code == 201
    assert wait_for(lambda: server.job("wrapped")["status"] == "completed", timeout=60)


def test_the_python_of_a_console_script_pip_wrote_for_a_long_or_spaced_path(tmp_path: Path) -> None:
    # pip writes `#!/bin/sh` and an '''exec' line when the Python's path does not fit a shebang: real ms-swift
    # was then called a wrapper script.
    from application.services.swift_command import interpreter_of, not_a_python_script

    python = tmp_path / "my venv" / "bin" / "python3.11"
    script = tmp_path / "swift"
    script.write_text(f"#!/bin/sh\n'''exec' \"{python}\" \"$0\" \"$@\"\n' '''\nimport sys\n")
    script.chmod(0o755)
    assert interpreter_of(str(script)) == str(python)
    assert not_a_python_script(str(script)) is None
    wrapper = tmp_path / "wrapper"
    wrapper.write_text('#!/bin/sh\nexec swift "$@"\n')
    wrapper.chmod(0o755)
    assert interpreter_of(str(wrapper)) is None and not_a_python_script(str(wrapper))


@pytest.fixture
def probed(server_factory: Callable[..., ApiServer], tmp_path: Path) -> ApiServer:
    seed_swift_probe(tmp_path)
    server = server_factory()
    assert server.http.get("/health").json()["swift"]["probed"] is True
    return server


def qwen_body(workspace: Path, name: str, **options: Any) -> dict[str, Any]:
    # A folder name ms-swift knows, so it needs no model_type/template (as with the real registry).
    model = make_model(workspace / "models" / "Qwen2.5-0.5B-Instruct")
    return job_body(workspace, name, model_path=str(model), **options)


def test_any_argument_reaches_swift_and_a_wrong_one_is_a_422_that_stores_nothing(probed: ApiServer,
                                                                                 workspace: Path) -> None:  # fmt: skip
    before = probed.http.get("/jobs").json()["total"]
    bad = probed.create(**qwen_body(workspace, "bad", training={"target_module": ["q_proj"]}))
    assert bad.status_code == 422 and "did you mean target_modules" in bad.json()["detail"]
    managed = probed.create(**qwen_body(workspace, "bad2", training={"output_dir": "/tmp/elsewhere"}))
    assert managed.status_code == 422 and "managed by the server" in managed.json()["detail"]
    outside = probed.create(**qwen_body(workspace, "bad3", training={"val_dataset": ["/etc/hostname"]}))
    assert outside.status_code == 422
    assert "training.val_dataset[0] must be inside DATA_ROOTS" in outside.json()["detail"]
    cached = probed.create(**qwen_body(workspace, "bad4", training={"cached_val_dataset": ["/etc"]}))
    assert cached.status_code == 422
    assert "training.cached_val_dataset[0] must be inside DATA_ROOTS" in cached.json()["detail"]
    assert probed.http.get("/jobs").json()["total"] == before

    val = fake_dataset(workspace, "val")
    training = {"lora_target_modules": ["q_proj", "v_proj"], "lr_scheduler_type": "linear", "seed": 7,
                "report_to": "tensorboard", "deepspeed": "zero2", "val_dataset": val, "max_steps": 4}  # fmt: skip
    r = probed.create(**qwen_body(workspace, "args", auto_start=True, training=training))
    assert r.status_code == 201, r.text
    job = probed.wait_status("args", "completed")
    assert job["training"]["target_modules"] == ["q_proj", "v_proj"] and job["training"]["val_dataset"] == [val]
    cmd = job["command"]
    assert cmd[cmd.index("--target_modules") + 1 : cmd.index("--target_modules") + 3] == ["q_proj", "v_proj"]
    # What the (fake) swift parsed and saved, as real swift saves args.json in its run folder.
    saved = json.loads((Path(job["run_dir"]) / "args.json").read_text())
    assert (saved["target_modules"], saved["lr_scheduler_type"], saved["seed"]) == (["q_proj", "v_proj"], "linear", 7)
    assert (saved["report_to"], saved["deepspeed"], saved["val_dataset"]) == ("tensorboard", "zero2", val)


def test_preference_training_runs_swift_rlhf_and_checks_its_data(probed: ApiServer, workspace: Path) -> None:
    plain = probed.create(**qwen_body(workspace, "dpo-plain", kind="rlhf"))
    assert plain.status_code == 422 and "rejected_response" in plain.json()["detail"]
    data = workspace / "pref.jsonl"
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
           "rejected_response": "go away"}  # fmt: skip
    data.write_text((json.dumps(row) + "\n") * 8)
    r = probed.create(**qwen_body(workspace, "dpo", kind="rlhf", rlhf_type="dpo", data_path=str(data),
                                  auto_start=True, training={"beta": 0.2, "max_steps": 4}))  # fmt: skip
    assert r.status_code == 201, r.text
    job = probed.wait_status("dpo", "completed")
    assert job["kind"] == "rlhf" and job["command"][1] == "rlhf"
    assert job["command"][job["command"].index("--rlhf_type") + 1] == "dpo" and "--beta" in job["command"]
    assert job["progress"]["current_step"] == 4 and job["checkpoints"]
    sft_only = probed.create(**qwen_body(workspace, "beta-sft", training={"beta": 0.2}))
    assert sft_only.status_code == 422 and "kind 'rlhf'" in sft_only.json()["detail"]
    # KTO: a label per row, and a total batch of 2 or more (swift failed on either after the job's wait).
    kto = probed.create(**qwen_body(workspace, "kto-plain", kind="rlhf", rlhf_type="kto"))
    assert kto.status_code == 422 and "'label' per row" in kto.json()["detail"], kto.text
    data.write_text((json.dumps({"messages": row["messages"], "label": True}) + "\n") * 8)
    kto = probed.create(**qwen_body(workspace, "kto-one", kind="rlhf", rlhf_type="kto", data_path=str(data),
                                    training={"batch_size": 1, "gradient_accumulation_steps": 1}))  # fmt: skip
    assert kto.status_code == 422 and "total batch of 2 or more" in kto.json()["detail"], kto.text
    # Packing without flash attention: refused before the wait, not failed after it.
    packed = probed.create(**qwen_body(workspace, "packed", num_gpus=0, training={"packing": True}))
    assert packed.status_code == 422 and "leave it out of a job with num_gpus 0" in packed.json()["detail"], packed.text


def test_without_a_runnable_swift_health_is_degraded_and_creates_are_503(server_factory: Callable[..., ApiServer],
                                                                         workspace: Path) -> None:  # fmt: skip
    server = server_factory(env={"SWIFT_BIN": str(workspace / "no-swift-here")})
    health = server.http.get("/health").json()
    assert health["status"] == "degraded" and health["swift"]["ok"] is False
    assert "was not found" in health["swift"]["detail"]
    r = server.create(**job_body(workspace, "nope"))
    assert r.status_code == 503 and "SWIFT_BIN" in r.json()["detail"]
    assert server.http.get("/jobs").json()["total"] == 0


def test_an_uploaded_file_serves_as_val_dataset_and_extra_dataset(probed: ApiServer, workspace: Path) -> None:
    rows = Path(fake_dataset(workspace, "upload-me")).read_bytes()
    up = probed.http.post("/files", files={"file": ("val.jsonl", rows)})
    assert up.status_code == 201, up.text
    stored = up.json()["path"]
    training = {"val_dataset": up.json()["id"], "dataset": [up.json()["id"]], "max_steps": 2}
    r = probed.create(**qwen_body(workspace, "valfile", auto_start=True, training=training))
    assert r.status_code == 201, r.text
    job = probed.wait_status("valfile", "completed")
    assert job["training"]["val_dataset"] == [stored] and job["training"]["dataset"] == [stored]
    cmd = job["command"]
    assert cmd[cmd.index("--dataset") + 2] == stored and cmd[cmd.index("--val_dataset") + 1] == stored
    unknown = probed.create(**qwen_body(workspace, "valfile2", training={"val_dataset": "file-" + "0" * 24}))
    assert unknown.status_code == 422 and "no such file" in unknown.json()["detail"]


def test_a_look_at_the_installed_swift_runs_without_the_servers_secrets_or_a_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It inherited the whole environment: the API keys, the Redis password and the webhook secret went to
    # ms-swift's imports, and a GPU too (review BA).
    dump = tmp_path / "env.txt"
    python = tmp_path / "python3"
    python.write_text(f"#!/bin/sh\nenv > {dump}\necho 4.6.0\n")
    python.chmod(0o755)
    swift = tmp_path / "swift"
    swift.write_text(f"#!{python}\n")
    swift.chmod(0o755)
    monkeypatch.setenv("API_KEYS", "alice:a-secret-key")
    monkeypatch.setenv("WEBHOOK_SECRET", "another-secret")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert detect_swift_version(str(swift), None) == SwiftVersion("4.6.0", "detected")
    seen = dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)
    assert "API_KEYS" not in seen and "WEBHOOK_SECRET" not in seen and seen["CUDA_VISIBLE_DEVICES"] == ""
    assert seen["PATH"] == os.environ["PATH"]
