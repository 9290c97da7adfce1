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
from application.models.job_request import JobCreate, TrainingParams

if TYPE_CHECKING:  # swift_info imports swift_command, which renders these arguments
    from application.services.swift_info import SwiftInfo

NAMED_FIELDS = tuple(TrainingParams.model_fields)
# Names other trainers use for the named fields, which no spelling distance finds: named as a hint only.
GUESSED = {"lr": "learning_rate", "epochs": "num_epochs", "epoch": "num_epochs", "bs": "batch_size",
           "rank": "lora_rank", "r": "lora_rank", "alpha": "lora_alpha", "dtype": "torch_dtype",
           "grad_accum": "gradient_accumulation_steps", "accumulation_steps": "gradient_accumulation_steps",
           "warmup": "warmup_ratio", "steps": "max_steps", "max_len": "max_length",
           "seq_len": "max_length"}  # fmt: skip
# The job's own fields, which a CLI's `--set` or a nested body puts under `training` by mistake.
JOB_FIELDS = tuple(name for name in JobCreate.model_fields if name != "training")
KIND_CLASSES = {"sft": "SftArguments", "pt": "PretrainArguments", "rlhf": "RLHFArguments"}

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
    # A model's or adapter's args.json then sets what it names, unchecked: data sets anywhere on the disk, and
    # external_plugins (Python files run before training).
    "load_args": "it takes arguments from an args.json in the model or adapter folder, unchecked: name them here",
    "load_data_args": "it takes data sets from an args.json in the model or adapter folder, unchecked: name them here",
    "push_to_hub": "swift would publish with the server's own hub token: export the model (POST .../export), "
    "download it from the artifacts and push it yourself",
}

# report_to integrations that publish with the server's own credentials, as push_to_hub would: trackio creates
# and deploys a Hugging Face Space with its HF_TOKEN (and "all" is every one installed, trackio among them).
REPORT_REFUSED = {
    "trackio": "trackio publishes a Hugging Face Space with the server's own HF_TOKEN (as push_to_hub would)",
    "all": "'all' reports to every integration installed, trackio among them (it publishes with the server's "
    "HF_TOKEN): name the ones you want",
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
_LEAVES_FOLDER = re.compile(r"^(/|~)|(^|/)\.\.(/|$)|:(/|~)")
# A URL: libraries write and read through them (fsspec: file://, hdfs://, s3://, ftp://), from the server's network.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
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


def closest_names(name: str, names: Any) -> str:
    near = difflib.get_close_matches(name, list(names), n=3, cutoff=0.6)
    return f": did you mean {' or '.join(near)}?" if near else ""


def check_arguments(kind: str, extra: Mapping[str, Any], info: SwiftInfo | None, *,
                    pending: bool = False) -> dict[str, Any]:  # fmt: skip
    """The extra `training` arguments, checked and converted (a null means swift's default: left out).
    Raises Invalid naming the first bad one; Unavailable while the scheduler has not read them yet (`pending`)."""
    out: dict[str, Any] = {}
    fields = fields_of(info, kind) if info is not None else {}
    for name, value in extra.items():
        # (clipped: a 10,000-character name came back whole in the message)
        where = f"training.{name}" if len(name) <= 64 else f"training.{name[:64]}... ({len(name)} characters)"
        _refuse_surrogates(where, name, value)
        if name in MANAGED:
            raise Invalid(f"{where} is managed by the server: {MANAGED[name]}")
        if name.startswith("trackio_"):
            raise Invalid(f"{where} is managed by the server: {REPORT_REFUSED['trackio']}")
        if _SECRET_NAME.search(name):
            raise Invalid(f"{where} is managed by the server: a secret does not belong in a job (it would be stored "
                          "and shown): set it in the server's environment")  # fmt: skip
        if _ADDRESS_NAME.search(name):
            raise Invalid(f"{where} is managed by the server: the run would connect to that address from the "
                          "server's network; an operator sets such services up")  # fmt: skip
        # (not before the scheduler has read the list: a real argument, max_epochs or model_author, was refused
        # for a field it resembles, where a retry would have been taken: review EQ)
        listed = info is not None and bool(info.arguments)
        if name not in fields and (listed or not pending) and (hint := _unknown_field_hint(name, listed)):
            raise Invalid(f"{where}: unknown field: {hint}")
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
                          + closest_names(name, fields))  # fmt: skip
        if value is None:
            continue
        out[name] = convert(where, name, value, spec)
        _check_range(where, name, out[name])
        if name == "report_to":
            for item in out[name] if isinstance(out[name], list) else [out[name]]:
                if (why := REPORT_REFUSED.get(str(item).strip().lower())) is not None:
                    raise Invalid(f"{where} '{item}' is refused: {why}; report to tensorboard (the default: its "
                                  "files are in the job's artifacts), or to wandb / swanlab where the operator "
                                  "set them up")  # fmt: skip
    return out


def _unknown_field_hint(name: str, listed: bool) -> str | None:
    """What a name that is no argument of swift's was likely meant as: a named field (misspelt, or as another
    trainer calls it), or a field of the job itself set under `training`. `listed`: swift's arguments are known
    (else a name like a job field's may be one of them: model_author is no misspelt model_path)."""
    if near := difflib.get_close_matches(name, NAMED_FIELDS, n=1, cutoff=0.8):
        return f"did you mean {near[0]}?"
    if (meant := GUESSED.get(name.lower())) is not None:
        return f"did you mean {meant}?"
    if name in JOB_FIELDS:
        job = name
    elif listed and (near := difflib.get_close_matches(name, JOB_FIELDS, n=1, cutoff=0.8)):
        job = near[0]
    else:
        return None
    return f"{job} is a field of the job, not of its training: set it beside `training`, not inside it"


# Arguments a fraction or a probability: their bounds (a high bound kept out when False), which swift's parser does
# not check; torch or transformers refuse a value outside them only once the run has started, after its wait
# (lora_dropout 1.5: "dropout probability has to be between 0 and 1": hunt ES).
UNIT_INTERVAL = {"lora_dropout": True, "boft_dropout": True, "vera_dropout": True, "label_smoothing_factor": True,
                 "freeze_parameters_ratio": True, "top_p": True, "min_p": True, "adam_beta1": False,
                 "adam_beta2": False}  # fmt: skip


def _check_range(where: str, name: str, value: Any) -> None:
    closed = UNIT_INTERVAL.get(name)
    if closed is None or not isinstance(value, int | float) or isinstance(value, bool):
        return
    if value < 0 or value > 1 or (value == 1 and not closed):
        bounds = "to 1" if closed else "up to, not including, 1"
        raise Invalid(f"{where} is {value:g}: it takes a value from 0 {bounds}")


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
        if name in ENV_ARGUMENTS:
            _check_environment(where, value)
        _check_object(where, value)
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
        if len(text) > 64 * 1024:
            raise Invalid(f"{where}: at most 64 KiB of JSON")
        return text
    return _scalar(where, name, value, spec)


# Arguments whose items ms-swift sets as environment variables of the run (upper-cased), for a model's own options.
# Only the names its models and templates read are taken: any other variable steers the process (BROWSER with
# MPLBACKEND ran a shell command as training ended, TENSORBOARD_LOGGING_DIR wrote anywhere: a hunt), and a list of
# forbidden names cannot be made complete. (ms-swift 3.x and 4.x, and qwen_vl_utils; SWIFT_* are its safety
# switches, and paths are left out but ROOT_IMAGE_DIR and MSO_PANELS, kept inside the job's folder. The embedding
# and reranker losses take their settings from here only.)
ENV_ARGUMENTS = frozenset({"model_kwargs"})
MODEL_ENV = frozenset(
    """
    MAX_PIXELS MIN_PIXELS MAX_RATIO IMAGE_FACTOR IMAGE_MAX_TOKEN_NUM IMAGE_MIN_TOKEN_NUM VIDEO_MAX_PIXELS
    VIDEO_MIN_PIXELS VIDEO_TOTAL_PIXELS VIDEO_MAX_TOKEN_NUM VIDEO_MIN_TOKEN_NUM FRAME_FACTOR FPS FPS_MIN_FRAMES
    FPS_MAX_FRAMES NFRAMES NUM_FRAMES MAX_NUM_FRAMES VLLM_NUM_FRAMES SPATIAL_MERGE_SIZE MAX_NUM VIDEO_MAX_NUM
    MAX_SLICE_NUMS VIDEO_MAX_SLICE_NUMS HD_NUM INPUT_SIZE IMAGE_SIZE IMG_SIZE BASE_SIZE CROP_MODE NUM_CROPS
    MAX_PARTITION DOWNSAMPLE_MODE VIDEO_SEGMENTS STACK_FRAMES MOSSVL_VISION_CHUNKED_LENGTH VIDEO_LOAD_BACKEND
    FORCE_QWENVL_VIDEO_READER SAMPLING_RATE N_MELS USE_AUDIO_IN_VIDEO ENABLE_AUDIO_OUTPUT INIT_AUDIO INIT_TTS
    SPEAKER_NAME ENABLE_THINKING THINKING_MODE THINKING_BUDGET REASONING_EFFORT SEED_USE_THINKING
    SEED_USE_BUDGET_INTERVAL NO_REPEAT_NGRAM_SIZE NGRAM_WINDOW CFG_WEIGHT CFG_SCALE GENERATION_RATIO
    QWENVL_BBOX_FORMAT MAX_POSITIVE_SAMPLES MAX_NEGATIVE_SAMPLES MSO_PANELS MSO_NO_PANELS MSO_BRANCH_CHUNK
    DEVICE_TFLOPS ROOT_IMAGE_DIR IMAGE_AREA MAX_POSITION_EMBEDDINGS INFONCE_TEMPERATURE INFONCE_USE_BATCH
    INFONCE_HARD_NEGATIVES INFONCE_MASK_FAKE_NEGATIVE INFONCE_INCLUDE_QQ INFONCE_INCLUDE_DD INFONCE_FAKE_NEG_MARGIN
    LISTWISE_RERANKER_TEMPERATURE LISTWISE_RERANKER_MIN_GROUP_SIZE GENERATIVE_RERANKER_POSITIVE_TOKEN
    GENERATIVE_RERANKER_NEGATIVE_TOKEN CLEF_LABEL_SMOOTHING CLEF_BRIER_WEIGHT OMNIJEV_RPS_WEIGHT
""".split()
)


def _check_environment(where: str, value: Mapping[str, Any]) -> None:
    for key, item in value.items():
        if key.upper() not in MODEL_ENV:
            near = closest_names(key.upper(), MODEL_ENV)
            raise Invalid(f"{where}.{key}: ms-swift sets each item as an environment variable of the run, and only a "
                          f"model's own options are taken (such as MAX_PIXELS, FPS_MAX_FRAMES, VIDEO_MAX_PIXELS)"
                          f"{near or '; see the README for the list'}")  # fmt: skip
        # (ms-swift sets str(value): "None" failed the run, and a NUL byte is no environment variable's)
        if item is None or isinstance(item, (dict, list)) or (isinstance(item, str) and "\x00" in item):
            raise Invalid(f"{where}.{key} is set as an environment variable: give a number, true/false or a word "
                          "(leave it out for the model's default)")  # fmt: skip


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
    elif isinstance(value, str) and _URL.search(value):
        raise Invalid(f"{where} is a URL: a library would read or write through it from the server's network; "
                      "leave it out or name a place inside the job's folder")  # fmt: skip
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
                      + closest_names(str(value), [str(c) for c in choices]))  # fmt: skip
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
    if not free and name not in DATA_ARGUMENTS | MODEL_ARGUMENTS and _URL.search(text):
        raise Invalid(f"{where} is a URL: ms-swift would read or write through it from the server's network")
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
