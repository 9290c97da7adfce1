"""Any `swift sft|pt|rlhf` argument in a job's `training`, checked against the installed ms-swift.

The names and types come from the argument dataclasses of the ms-swift that will run the job (`swift_probe`,
cached per version). A request's extra `training` keys are checked here, before the job is stored:

- unknown names get the closest real ones ("did you mean target_modules?"), and a name that belongs to another
  kind of training says which (`beta` is an argument of `swift rlhf`);
- values are type-checked and converted to what the CLI parses: lists, bools, numbers, dicts as JSON;
- arguments the server manages (output_dir, resume_from_checkpoint, ...) and ones that load code or read
  files anywhere on the host are refused with the reason;
- path-taking arguments (val_dataset, ref_model, adapters, ...) are resolved inside DATA_ROOTS / MODEL_ROOTS
  by the pre-flight check, like data_path and model_path.

Pure: no I/O. The converted values are stored with the job and rendered by `argv_of` when the command is built.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import sys
from collections.abc import Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from application.exceptions import Invalid, Unavailable
from application.models.job_request import ALIASES as ALIASES
from application.models.job_request import TrainingParams

if TYPE_CHECKING:  # swift_info imports swift_command, which renders these arguments
    from application.services.swift_info import SwiftInfo

NAMED_FIELDS = tuple(TrainingParams.model_fields)
KIND_CLASSES = {"sft": "SftArguments", "pt": "PretrainArguments", "rlhf": "RLHFArguments"}

# Named TrainingParams fields and the swift names they stand for (both spellings are accepted in `training`).
SWIFT_NAMES = {"num_epochs": "num_train_epochs", "batch_size": "per_device_train_batch_size",
               "train_type": "tuner_type"}  # fmt: skip
MANAGED = {
    "model": "set the job's model_path",
    "output_dir": "set the job's output_dir (a folder under OUTPUT_ROOT)",
    "logging_dir": "the server keeps logs in the job's output folder",
    "add_version": "the server finds runs by their v<N>-<time> folders",
    "resume_from_checkpoint": "use POST .../jobs/{id}/resume, which resumes from the job's last checkpoint",
    "resume_only_model": "use POST .../jobs/{id}/resume",
    "ignore_args_error": "arguments are checked by the server",
    "local_rank": "the launcher sets it per process",
    "rlhf_type": "set the job's rlhf_type (with kind 'rlhf')",
    "ckpt_dir": "use POST .../jobs/{id}/export",
    "hub_token": "a secret does not belong in a job (it would be stored and shown): set MODELSCOPE_API_TOKEN / "
    "HF_TOKEN in the server's environment",
    "local_repo_path": "it reads a folder anywhere on the server's disk",
    "custom_register_path": "it runs Python files from the server's disk",
    "external_plugins": "it runs Python files from the server's disk",
    "custom_dataset_info": "it reads a file from anywhere on the server: register data sets by path instead",
    "push_to_hub": "swift would publish with the server's own hub token: export the model (POST .../export), "
    "download it from the artifacts and push it yourself",
}

# Arguments that name data sets or models: resolved by the pre-flight check like data_path / model_path.
DATA_ARGUMENTS = frozenset({"dataset", "val_dataset", "cached_dataset", "cached_val_dataset", "chord_sft_dataset"})
MODEL_ARGUMENTS = frozenset({"ref_model", "reward_model", "teacher_model", "adapters", "ref_adapters",
                             "reward_adapters", "teacher_adapters"})  # fmt: skip
# Named presets that need no file (ms-swift's own `swift/llm/ds_config/*.json`).
DEEPSPEED_PRESETS = frozenset({"zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"})
# Object arguments that also take a word (ms-swift: Union[dict, str]; a file path there is not taken).
WORDS = {"deepspeed": DEEPSPEED_PRESETS, "teacher_deepspeed": DEEPSPEED_PRESETS,
         "device_map": frozenset({"auto", "balanced", "balanced_low_0", "sequential", "cpu"}),
         "fsdp": frozenset({"fsdp2"}), "rope_scaling": frozenset({"linear", "dynamic", "yarn"})}  # fmt: skip
# Declared `str`, but ms-swift parses the text as JSON (its json_parse_to_dict, which also "repairs" text that is
# not JSON into an object): taken as objects, so that their contents are checked like deepspeed's (a DeepSpeed
# nvme_path is a folder on the server's disk).
JSON_TEXT = frozenset({"teacher_deepspeed", "fsdp", "rope_scaling"})

# rlhf types whose rows need a rejected answer (KTO labels single answers; PPO/GRPO need prompts only).
PREFERENCE_TYPES = frozenset({"dpo", "orpo", "simpo", "cpo", "rm"})

MAX_TEXT = 4096
MAX_ITEMS = 256
# ms-swift reads a string ending in these (or an absolute path) as a file to load: only the path-taking
# arguments above may name files, inside the configured roots.
# A `.` or `..` component names a folder relative to swift's (the job's folder), or above it.
_FILE_LIKE = re.compile(r"(^(/|~))|((^|/)\.{1,2}(/|$))|(\.(txt|json|jsonl|yaml|yml|py|csv|sh|pkl|pt|bin)$)", re.I)
# A path that leaves swift's working folder (the job's own): absolute, from a home folder, or through `..`.
_LEAVES_FOLDER = re.compile(r"^(/|~)|(^|/)\.\.(/|$)")
_SECRET_NAME = re.compile(r"(_token|api_key|secret|password)$")
# Addresses the run would connect to from the server's network (a webhook, a mail server, a vLLM or teacher
# server): the request's choice would reach internal hosts.
_ADDRESS_NAME = re.compile(r"(_url|_urls|_host|_hosts|_server|_endpoint)$")
# (Bidi marks and embeddings make a name read otherwise than it is; zero-width and line-separator characters
# hide in names. Free text keeps ZWNJ/ZWJ/ZWSP, which Persian, Indic and Thai text use.)
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u061c\u200b-\u200f\u2028-\u202e\u2060\u2066-\u2069\ufeff]")
# Prompts and stop strings: their line breaks and tabs are theirs (argv is a list: no shell reads them), and
# swift reads none of them from a file but a `system` ending in .txt.
FREE_TEXT = frozenset({"system", "stop_words", "response_prefix"})
# Free texts of one value: sent as `--name=value`, so they may start with '-' (a Markdown list, a '---' rule).
OWN_TEXT = frozenset({"system", "response_prefix"})
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def swift_name(name: str) -> str:
    return SWIFT_NAMES.get(name, name)


def fields_of(info: SwiftInfo, kind: str) -> dict[str, dict[str, Any]]:
    # 3.x has no PretrainArguments / SftArguments split in every release: TrainArguments stands in.
    args = info.arguments
    return args.get(KIND_CLASSES[kind]) or args.get("SftArguments") or args.get("TrainArguments") or {}


def require_usable_swift(meta: Mapping[str, Any] | None) -> None:
    """Refuse (503) a job the installed ms-swift could not run: better now than exit code 127 after its wait.
    Before the scheduler has looked (meta None), the job is taken; the runner reports a missing swift."""
    if meta is not None and meta.get("found") is False:
        raise Unavailable(f"ms-swift cannot be run here: {meta.get('reason') or 'SWIFT_BIN not found'}. An operator "
                          "must fix SWIFT_BIN (see GET /health) and restart the scheduler")  # fmt: skip


def check_kind(kind: str, rlhf_type: str | None, info: SwiftInfo | None) -> None:
    if kind != "rlhf" or info is None:
        return
    spec = info.arguments.get("RLHFArguments", {}).get("rlhf_type")
    if spec is None:
        raise Invalid(f"kind 'rlhf' needs `swift rlhf`, which ms-swift {info.version} does not have")
    choices = spec.get("choices") or []
    if choices and rlhf_type not in choices:
        raise Invalid(f"rlhf_type '{rlhf_type}' is not one of ms-swift {info.version}'s: {', '.join(choices)}"
                      + _closest(str(rlhf_type), choices))  # fmt: skip


def check_kto_batch(per_device: int, accumulation: int, gpus: int, arguments: Mapping[str, Any]) -> None:
    """KTO (but for its apo_zero_unpaired loss) needs a total batch of 2 or more: swift fails at once with one."""
    loss = arguments.get("loss_type")  # (a list in ms-swift 4.x's RLHFArguments; swift takes its one item)
    if (loss[0] if isinstance(loss, list) and len(loss) == 1 else loss) == "apo_zero_unpaired":
        return
    total = arguments.get("global_batch_size") or per_device * accumulation * max(1, gpus)
    if isinstance(total, int) and total <= 1:
        raise Invalid("KTO needs a total batch of 2 or more (batch_size x gradient_accumulation_steps x GPUs): "
                      "its KL term would equal the implied reward; raise batch_size or "
                      "gradient_accumulation_steps")  # fmt: skip


# ms-swift's num_generations when a GRPO job does not name one (3.x and 4.x).
GRPO_GENERATIONS = 8
# The largest num_generations a refusal suggests (completions per prompt: 2 to a few dozen in practice).
SUGGESTED_GENERATIONS_MAX = 1024


def check_grpo_batch(per_device: int, accumulation: int, gpus: int, arguments: Mapping[str, Any],
                     split_ratio: float | None = None) -> None:  # fmt: skip
    """GRPO samples num_generations completions per prompt from each generation batch: swift refuses, at once,
    a generation batch they do not divide (ms-swift's `_init_generation_batch_params`, with its defaults: the
    batch is per-device batch x processes x gradient_accumulation_steps). With the server's defaults (1 x 1 x 4)
    and swift's 8 generations every GRPO job failed so. With evaluation on (`split_ratio` above 0, or a
    val_dataset), the eval batch (per_device_eval_batch_size, 1 by default, x processes) must divide by its
    generations too."""
    generations = arguments.get("num_generations", GRPO_GENERATIONS)
    steps, batch = arguments.get("steps_per_generation"), arguments.get("generation_batch_size")
    if not all(isinstance(v, int) for v in (generations, steps or 1, batch or 1)) or generations <= 1:
        return  # (swift says what is wrong with these itself)
    processes = max(1, gpus)
    per_step = per_device * processes
    if batch is None:
        batch = per_step * (steps or accumulation)
    elif batch % per_step:
        raise Invalid(f"training.generation_batch_size ({batch}) must be a multiple of batch_size x GPUs "
                      f"({per_step}) for GRPO")  # fmt: skip
    elif steps is not None and batch != per_step * steps:
        raise Invalid(f"training.generation_batch_size ({batch}) must equal batch_size x GPUs x "
                      f"steps_per_generation ({per_step * steps}) for GRPO: give one of the two")  # fmt: skip
    if batch % generations:
        named = "training.num_generations" if "num_generations" in arguments else \
            f"training.num_generations (ms-swift's default is {GRPO_GENERATIONS})"  # fmt: skip
        # (a bounded search: the batch is the request's number, and a loop up to it held the event loop)
        fits = [n for n in range(2, min(batch, SUGGESTED_GENERATIONS_MAX) + 1) if batch % n == 0][:12]
        hint = f"set it to one of {fits}, or raise the batch" if fits else "make the batch a multiple of it"
        raise Invalid(f"GRPO's generation batch ({batch}: batch_size x GPUs x gradient_accumulation_steps, or "
                      f"generation_batch_size) must be divisible by {named}: {hint}")  # fmt: skip
    evaluates = (split_ratio or 0) > 0 or bool(arguments.get("val_dataset"))
    if evaluates and arguments.get("eval_strategy") != "no":
        per_eval = arguments.get("per_device_eval_batch_size", 1)
        eval_generations = arguments.get("num_generations_eval") or generations
        if (
            isinstance(per_eval, int)
            and isinstance(eval_generations, int)
            and (per_eval * processes) % eval_generations
        ):
            raise Invalid(f"GRPO evaluates (split_dataset_ratio or val_dataset): its eval batch "
                          f"(per_device_eval_batch_size {per_eval} x {processes} process(es)) must be divisible by "
                          f"num_generations_eval ({eval_generations}, else num_generations): set "
                          f"training.per_device_eval_batch_size to a multiple of {eval_generations}, or "
                          "num_generations_eval")  # fmt: skip


def check_ref_model(rlhf_type: str, train_type: str, arguments: Mapping[str, Any]) -> None:
    """swift takes a ref_model only for a full fine-tune with dpo, kto, ppo or grpo; it refuses one at start
    otherwise (LoRA's reference is the base model itself, with the adapter off)."""
    if arguments.get("ref_model") is None or (rlhf_type in ("dpo", "kto", "ppo", "grpo") and train_type == "full"):
        return
    if rlhf_type == "grpo" and arguments.get("beta") == 0:
        return  # (swift drops it: no reference at all)
    why = "LoRA and other adapters use the base model itself" if rlhf_type in ("dpo", "kto", "ppo", "grpo") else \
        f"{rlhf_type} has no reference model"  # fmt: skip
    raise Invalid(f"training.ref_model is only for a full fine-tune (train_type 'full') with dpo, kto, ppo or grpo: "
                  f"{why}; leave it out")  # fmt: skip


# ms-swift 4.x refuses, as it starts, packing or padding_free without a flash attention implementation
# (SftArguments._check_padding_free), and beside an rlhf_type other than these (RLHFArguments).
FLASH_ATTENTION = ("flash_attn", "flash_attention_2", "flash_attention_3", "flash_attention_4")
PACKING_RLHF_TYPES = ("grpo", "dpo", "kto", "gkd")


def check_packing(kind: str, rlhf_type: str | None, arguments: Mapping[str, Any], gpus: int,
                  info: SwiftInfo | None) -> None:  # fmt: skip
    """Packing (which turns padding_free on) and padding_free as ms-swift 4.x takes them: every such job without
    `attn_impl: flash_attn` was accepted and then failed after its wait. (3.x releases differ: left to swift.)"""
    feature = "packing" if arguments.get("packing") else "padding_free" if arguments.get("padding_free") else None
    major = info.version.split(".")[0] if info is not None else ""
    if feature is None or info is None or not major.isdigit() or int(major) < 4:
        return
    where, version = f"training.{feature}", f"ms-swift {info.version}"
    if gpus == 0:  # (attn_impl flash_attn or not: flash-attn runs on a GPU only)
        raise Invalid(f"{where} needs a flash attention implementation in {version}, and flash attention needs "
                      "a GPU: leave it out of a job with num_gpus 0")  # fmt: skip
    if arguments.get("attn_impl") not in FLASH_ATTENTION:
        raise Invalid(f"{where} needs a flash attention implementation in {version}: set training.attn_impl to one "
                      f"of {', '.join(FLASH_ATTENTION)} (flash-attn installed beside ms-swift), or leave "
                      f"{feature} out")  # fmt: skip
    if kind == "rlhf" and rlhf_type not in PACKING_RLHF_TYPES:
        raise Invalid(f"{where} does not work with rlhf_type '{rlhf_type}' in {version} (only with "
                      f"{', '.join(PACKING_RLHF_TYPES)}): leave it out")  # fmt: skip


# What ms-swift's get_quantization_config takes when it loads the model to train (4.x): the bits of each method.
QUANT_BITS: dict[str, tuple[int | str, ...] | None] = {
    "bnb": (4, 8), "hqq": (1, 2, 3, 4, 8), "eetq": (8,), "quanto": (2, 4, 8, "float8"), "fp8": None,
}  # fmt: skip


def check_combinations(rlhf_type: str | None, arguments: Mapping[str, Any]) -> None:
    """Arguments that are fine one by one and that ms-swift refuses together as the run starts (after the wait),
    or that do nothing together."""
    if arguments.get("deepspeed") and arguments.get("fsdp"):
        raise Invalid("training.deepspeed and training.fsdp cannot be used together (ms-swift refuses FSDP with "
                      "DeepSpeed as the run starts): keep one of them")  # fmt: skip
    if rlhf_type == "ppo" and not arguments.get("reward_model"):  # (else an AttributeError as the run starts)
        raise Invalid("rlhf_type 'ppo' needs training.reward_model: its value model starts from the reward model; "
                      "name one (a hub id, or a folder inside MODEL_ROOTS)")  # fmt: skip
    method, bits = arguments.get("quant_method"), arguments.get("quant_bits")
    if bits is not None and method is None:
        raise Invalid("training.quant_bits does nothing without training.quant_method: ms-swift then loads the "
                      "model unquantized; set quant_method (bnb for QLoRA)")  # fmt: skip
    allowed = QUANT_BITS.get(method) if isinstance(method, str) else None
    if allowed is not None and bits is None:
        raise Invalid(f"training.quant_method {method} needs training.quant_bits "
                      f"({', '.join(str(b) for b in allowed)})")  # fmt: skip
    if allowed is not None and bits not in allowed:
        raise Invalid(f"training.quant_bits {bits} does not work with quant_method {method} in ms-swift: use "
                      f"{', '.join(str(b) for b in allowed)}")  # fmt: skip
    if arguments.get("cached_dataset") or arguments.get("cached_val_dataset"):
        if rlhf_type == "grpo":
            raise Invalid("training.cached_dataset is not supported for GRPO by ms-swift: give the data set itself")
        if arguments.get("streaming"):
            raise Invalid("training.streaming does not work with a cached data set in ms-swift: leave one out")


def _closest(name: str, names: Any) -> str:
    near = difflib.get_close_matches(name, list(names), n=3, cutoff=0.6)
    return f": did you mean {' or '.join(near)}?" if near else ""


def check_arguments(kind: str, extra: Mapping[str, Any], info: SwiftInfo | None, *,
                    pending: bool = False) -> dict[str, Any]:  # fmt: skip
    """The extra `training` arguments, checked and converted (a null means swift's default: left out).
    Raises Invalid naming the first bad one; Unavailable while the scheduler has not read them yet (`pending`)."""
    out: dict[str, Any] = {}
    fields = fields_of(info, kind) if info is not None else {}
    for name, value in extra.items():
        where = f"training.{name}"
        _refuse_surrogates(where, name, value)
        if name in MANAGED:
            raise Invalid(f"{where} is managed by the server: {MANAGED[name]}")
        if _SECRET_NAME.search(name):
            raise Invalid(f"{where} is managed by the server: a secret does not belong in a job (it would be stored "
                          "and shown): set it in the server's environment")  # fmt: skip
        if _ADDRESS_NAME.search(name):
            raise Invalid(f"{where} is managed by the server: the run would connect to that address from the "
                          "server's network; an operator sets such services up")  # fmt: skip
        if name not in fields and (near := difflib.get_close_matches(name, NAMED_FIELDS, n=1, cutoff=0.8)):
            raise Invalid(f"{where}: unknown field: did you mean {near[0]}?")
        if info is None or not info.arguments:
            if pending:
                raise Unavailable("the scheduler has not read the installed ms-swift's arguments yet (it does at "
                                  "start, in about 10 s): try again shortly", {"Retry-After": "5"})  # fmt: skip
            raise Invalid(f"{where}: the server could not read the argument list of the installed ms-swift (see "
                          "GET /health, swift.detail), so only the named training fields can be set")  # fmt: skip
        spec = fields.get(name)
        if spec is None:
            others = [k for k, cls in KIND_CLASSES.items() if k != kind and name in info.arguments.get(cls, {})]
            if others:
                raise Invalid(f"{where} is an argument of `swift {others[0]}`, not `swift {kind}`: set kind "
                              f"'{others[0]}' to use it")  # fmt: skip
            raise Invalid(f"{where} is not an argument of `swift {kind}` in ms-swift {info.version}"
                          + _closest(name, fields))  # fmt: skip
        if value is None:
            continue
        out[name] = convert(where, name, value, spec)
    return out


_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _refuse_surrogates(where: str, name: Any, value: Any, depth: int = 0) -> None:
    """A lone UTF-16 surrogate (JSON's "\\ud800") is no text: stored, it made the job unreadable (every route
    on it a 500, and a queued one stopped every queue pass). Named fields refuse it themselves."""
    if depth > 64:
        return  # (nesting is bounded where objects are checked)
    if isinstance(name, str) and _SURROGATE.search(name):
        raise Invalid(f"{_shown(where)}: a name holds a lone surrogate (\\ud800-\\udfff): send valid Unicode text")
    if isinstance(value, str) and _SURROGATE.search(value):
        raise Invalid(f"{_shown(where)} holds a lone surrogate (\\ud800-\\udfff): send valid Unicode text")
    if isinstance(value, dict):
        for key, item in value.items():
            _refuse_surrogates(f"{where}.{key}", key, item, depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _refuse_surrogates(f"{where}[{i}]", None, item, depth + 1)


def _shown(where: str) -> str:
    return _SURROGATE.sub("?", where)


def convert(where: str, name: str, value: Any, spec: Mapping[str, Any]) -> Any:
    """One value as the CLI will parse it: str/int/float/bool, a list of them, or a JSON text for a dict."""
    kind = "dict" if name in JSON_TEXT else spec.get("kind", "any")
    if kind == "unparsable":  # (a `dict` or config class: swift's parser fails on any text for it)
        raise Invalid(f"{where} cannot be given on ms-swift's command line (its parser takes no text for it): "
                      "leave it out")  # fmt: skip
    if kind == "list":
        items = value if isinstance(value, list) else [value]
        if not items:
            raise Invalid(f"{where}: give at least one item, or null for swift's default")
        if len(items) > MAX_ITEMS:
            raise Invalid(f"{where}: at most {MAX_ITEMS} items")
        choices = spec.get("item_choices")
        item = {"kind": "literal", "choices": choices} if choices else {"kind": spec.get("item", "str")}
        return [_scalar(f"{where}[{i}]", name, v, item) for i, v in enumerate(items)]
    if kind == "dict":
        if isinstance(value, str) and value in WORDS.get(name, ()):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                value = None
        if not isinstance(value, dict):
            presets = f" or one of {', '.join(sorted(WORDS[name]))}" if name in WORDS else ""
            raise Invalid(f"{where} takes a JSON object{presets}")
        _check_object(where, value)
        if name in ENV_ARGUMENTS:
            _check_environment(where, value)
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
        if len(text) > 64 * 1024:
            raise Invalid(f"{where}: at most 64 KiB of JSON")
        return text
    return _scalar(where, name, value, spec)


# Arguments whose items ms-swift sets as environment variables of the run (upper-cased): meant for a model's
# own options (MAX_PIXELS, FPS, ...), not for those that steer its network, libraries, hubs, trackers or GPUs.
ENV_ARGUMENTS = frozenset({"model_kwargs"})
_PROCESS_ENV = re.compile(
    r"(PATH|HOME|USER|SHELL|ENV|BASH_ENV|IFS|TMPDIR|TMP|TEMP|RANK|LOCAL_RANK|WORLD_SIZE|LOCAL_WORLD_SIZE|NNODES|"
    r"NODE_RANK|NPROC_PER_NODE|USE_HF|.*PROXY|(LD|PYTHON|HF|HUGGINGFACE|MODELSCOPE|WANDB|SWANLAB|REQUESTS|CURL|SSL|"
    r"CUDA|NCCL|TORCH|OMP|MKL|MASTER|XDG|TRANSFORMERS|DS|DEEPSPEED|ACCELERATE|TRITON|GIT|PERL|RUBY|NODE|JAVA|GLIBC|"
    r"MALLOC|SWIFT|TOKENIZERS|NVIDIA|VLLM|TF|XLA|AWS|GOOGLE|AZURE|OSS|COMET|MLFLOW|NEPTUNE|CLEARML|DVC)\w*)"
)


def _check_environment(where: str, value: Mapping[str, Any]) -> None:
    for key in value:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", key):
            raise Invalid(f"{where}.{key}: ms-swift sets each item as an environment variable: name it with letters, "
                          "digits and '_'")  # fmt: skip
        if _PROCESS_ENV.fullmatch(key.upper()):
            raise Invalid(f"{where}.{key}: ms-swift sets each item as an environment variable of the run, and "
                          f"{key.upper()} would change how the server runs it (its network, libraries, hubs or "
                          "GPUs): only a model's own options (such as MAX_PIXELS) go here")  # fmt: skip


def _check_object(where: str, value: Any, depth: int = 0) -> None:
    """What a JSON-object argument holds: swift passes its texts on (a DeepSpeed nvme_path or tensorboard
    output_path, a cache_dir), so none may be a path out of swift's working folder (the job's), and JSON has no
    NaN or Infinity. Other texts are free: the JSON encoding escapes control characters."""
    if depth > 32:
        raise Invalid(f"{where}: nested too deeply (32 levels at most)")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_object(f"{where}.{key}", item, depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_object(f"{where}[{i}]", item, depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise Invalid(f"{where} takes a finite number")
    elif isinstance(value, str) and _LEAVES_FOLDER.search(value):
        raise Invalid(
            f"{where} is a path that leaves the job's folder (absolute, ~ or ..): ms-swift would read or write "
            "it anywhere on the server's disk; leave it out or name a place inside the job's folder"
        )


def _scalar(where: str, name: str, value: Any, spec: Mapping[str, Any]) -> Any:
    kind = spec.get("kind", "any")
    if isinstance(value, float) and not math.isfinite(value):
        raise Invalid(f"{where} takes a finite number")
    if isinstance(value, (list, dict)):
        raise Invalid(f"{where} takes one value, not a {'list' if isinstance(value, list) else 'JSON object'}")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise Invalid(f"{where} takes true or false")
    if kind == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str) and re.fullmatch(r"-?\d{1,18}", value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f"{where} takes a whole number")
        if not -(2**63) <= value < 2**63:  # swift's own arithmetic (and torch's) is 64-bit
            raise Invalid(f"{where} takes a whole number of at most 19 digits")
        return value
    if kind == "float":
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (isinstance(value, int) and abs(value) > sys.float_info.max) or not math.isfinite(value):  # fmt: skip
            raise Invalid(f"{where} takes a finite number")  # (10**400 is an int no float holds)
        return value
    if kind == "literal" and spec.get("choices"):
        choices = spec["choices"]
        for choice in choices:
            # (True == 1 in Python: `quant_bits: true` was taken as 1-bit quantization)
            if (isinstance(value, bool) is isinstance(choice, bool) and value == choice) or \
                    (not isinstance(value, bool) and str(value) == str(choice)):  # fmt: skip
                return choice
        raise Invalid(f"{where} must be one of {', '.join(str(c) for c in choices)}"
                      + _closest(str(value), [str(c) for c in choices]))  # fmt: skip
    if isinstance(value, bool):
        value = "true" if value else "false"
    text = str(value)
    if len(text) > MAX_TEXT:
        raise Invalid(f"{where}: at most {MAX_TEXT} characters")
    free = name in FREE_TEXT
    if (_TEXT_CONTROL if free else _CONTROL).search(text):
        raise Invalid(f"{where} contains a control or bidirectional character")
    # (A text of its own, such as a system prompt that is a list, is sent as --name=value: swift reads it whole.)
    if text.startswith("-") and not re.fullmatch(r"-\d+(\.\d+)?", text) and name not in OWN_TEXT:
        raise Invalid(f"{where} must not start with '-' (swift would read it as an option)")
    if name == "system" and text.lower().endswith(".txt"):  # (only `system` is read from a file by ms-swift)
        raise Invalid(f"{where} ends in .txt: ms-swift would read it as a file from the server's disk; put the "
                      "text itself here")  # fmt: skip
    if not free and name not in DATA_ARGUMENTS | MODEL_ARGUMENTS and _FILE_LIKE.search(text):
        raise Invalid(f"{where} looks like a file path: ms-swift would read it from the server's disk. Only "
                      "data sets (data_path, dataset, val_dataset) and models (model_path, ref_model, adapters, "
                      "...) may name files, inside DATA_ROOTS / MODEL_ROOTS")  # fmt: skip
    return text


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value < 0:
        # argparse takes `-1e-05` for an option (its negative-number pattern has no exponent): written out.
        return format(Decimal(repr(value)), "f")
    return repr(value) if isinstance(value, float) else str(value)


def argv_of(arguments: Mapping[str, Any]) -> list[str]:
    """`--name value` (a list: `--name v1 v2 ...`) for checked arguments, in the order given."""
    argv: list[str] = []
    for name, value in arguments.items():
        if value is None:
            continue
        if isinstance(value, str) and value.startswith("-"):
            argv.append(f"--{name}={value}")  # (argparse reads `--name -x` as two options)
            continue
        argv.append(f"--{name}")
        argv += [_flag_value(v) for v in value] if isinstance(value, list) else [_flag_value(value)]
    return argv
