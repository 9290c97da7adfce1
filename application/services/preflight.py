"""Checks before a job takes a queue slot: a job that cannot start should fail in milliseconds, not after hours.

* A local data set must be one ms-swift can train on (`datasets.check_dataset`), and the media its rows name
  must lie inside DATA_ROOTS (`media_refs`).
* A local model folder needs `config.json` and tokenizer files; when the installed ms-swift cannot tell the
  model's type or template from the folder (it matches the folder's name against its registry, then the
  architecture in config.json), the request must name them.

Synchronous and bounded (only the first bytes are parsed; counting rows reads at most COUNT_MAX_BYTES):
callers run it in a thread, unless `runs_inline` says all it would touch is the output folder's path.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from application.config import ENV_DIR, PROJECT_ROOT, Settings
from application.exceptions import Invalid
from application.models.job_request import JobCreate
from application.services.dataset_folders import check_data_folder
from application.services.dataset_rows import Needs, renamed_columns
from application.services.datasets import DatasetInfo, check_dataset
from application.services.media_refs import check_media, check_media_folder, media_columns
from application.services.path_sandbox import (
    Guard,
    all_of,
    check_folder_links,
    is_file,
    is_hub_id,
    own_files_guard,
    resolve,
    resolve_output_dir,
)
from application.services.swift_arguments import DATA_ARGUMENTS, MODEL_ARGUMENTS, check_arguments
from application.services.swift_combinations import (
    check_combinations,
    check_grpo_batch,
    check_kind,
    check_kto_batch,
    check_packing,
    check_ref_model,
)
from application.services.swift_info import SwiftInfo
from application.utils.regular_files import open_regular

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model",
                   "qwen.tiktoken", "tiktoken.model")  # fmt: skip


def _read_json(path: Path) -> Any:
    try:
        with open_regular(path) as f:  # (a FIFO as a model's config.json held the create's thread for ever)
            raw = f.read((16 << 20) + 1)
        return json.loads(raw) if len(raw) <= 16 << 20 else None
    except (OSError, ValueError, RecursionError):
        return None


def _closest(word: str, choices: Any) -> str:
    near = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(near)}?)" if near else ""


def _templates_of(info: SwiftInfo, model_type: str) -> str:
    meta = info.types.get(model_type)
    if meta is None or not (meta.template or meta.candidates):
        return "any template"
    if meta.template or len(meta.candidates) == 1:
        return meta.template or meta.candidates[0]
    return f"one of {', '.join(meta.candidates)}"


def check_model(field: str, path: Path, model_type: str | None, template: str | None,
                info: SwiftInfo | None) -> None:  # fmt: skip
    """Raise Invalid when ms-swift could not load this model folder as asked."""
    try:
        if not path.is_dir():
            raise Invalid(
                f"{field} '{path}' is not a folder: a local model is a folder with config.json and a tokenizer"
            )
        names = set(os.listdir(path))
    except OSError as exc:
        raise Invalid(f"{field} '{path}' cannot be read ({exc.strerror})") from None
    if "config.json" not in names:
        raise Invalid(f"{field} '{path}' has no config.json: is it a Hugging Face model folder?")
    if not names.intersection(TOKENIZER_FILES):
        raise Invalid(f"{field} '{path}' has no tokenizer files (tokenizer.json, tokenizer.model, ...)")
    if info is None:
        return  # the installed ms-swift is unknown: it will tell at run time
    check_named_types(model_type, template, info)
    # ms-swift's own order (swift/model/model_meta.py): folder name, args.json, then the architecture.
    folder = path.name.replace("___", ".").lower()
    group_template: str | None = None
    if model_type is None and folder in info.names:
        model_type, group_template = info.names[folder]
    if model_type is None:
        args = _read_json(path / "args.json")
        if isinstance(args, dict) and isinstance(args.get("model_type"), str):
            model_type = args["model_type"]
            template = template or (args.get("template") if isinstance(args.get("template"), str) else None)
    if model_type is None:
        config = _read_json(path / "config.json")
        archs = config.get("architectures") if isinstance(config, dict) else None
        arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
        candidates = info.types_for_architecture(arch)
        if len(candidates) > 1:
            # With each type's templates: the answer names everything to set, not one field per try.
            templates = "; ".join(f"{c}: {_templates_of(info, c)}" for c in candidates)
            raise Invalid(
                f"ms-swift cannot tell the model type of '{path.name}' from its folder name, and its architecture "
                f"{arch or '(none)'} fits several: set training.model_type (one of {', '.join(candidates)}) "
                f"and training.template ({templates})"
            )
        if not candidates:
            return  # ms-swift treats it as a generic text model
        model_type = candidates[0]
    if template is None and group_template is None:
        meta = info.types.get(model_type)
        if meta is not None and meta.template is None and len(meta.candidates) != 1:
            options = f" (one of {', '.join(meta.candidates)})" if meta.candidates else ""
            raise Invalid(f"ms-swift cannot tell which chat template model type '{model_type}' uses: set "
                          f"training.template{options}")  # fmt: skip


@dataclass(frozen=True)
class CheckedRequest:
    """A create request's paths as swift will get them, and what the checks learned."""

    data_path: str
    model_path: str
    output_dir: Path
    dataset: DatasetInfo | None
    arguments: dict[str, Any] = field(default_factory=dict)
    output_is_file: bool = False  # refused when the job is stored, after the check of whose folder it is in


def check_request(
    data_path: str,
    model_path: str,
    output_dir: str,
    *,
    model_type: str | None,
    template: str | None,
    settings: Settings,
    info: SwiftInfo | None,
    needs: Needs = None,
    arguments: dict[str, Any] | None = None,
    guard: Guard | None = None,
) -> CheckedRequest:
    """The path sandbox (with `guard`, see path_sandbox.Guard, and `own_files`), then the data set and model checks.
    Synchronous (touches the disk): run it in a thread (a guard may be called only there)."""
    guard = all_of(guard, own_files(settings))
    out = resolve_output_dir(output_dir, settings.OUTPUT_ROOT)
    data = resolve("data_path", data_path, settings.data_roots(), data=True, base=PROJECT_ROOT,
                   setting="DATA_ROOTS", guard=guard)  # fmt: skip
    model = resolve("model_path", model_path, settings.model_roots(), data=False, base=PROJECT_ROOT,
                    setting="MODEL_ROOTS or OUTPUT_ROOT", guard=guard)  # fmt: skip
    columns = renamed_columns(arguments or {})
    dataset = check_dataset("data_path", data.path, needs=needs, columns=columns) if data.path is not None else None
    if data.path is not None:
        check_media("data_path", data.path, settings.data_roots(), guard, media_columns(arguments or {}))
    if model.path is not None:
        check_model_links("model_path", model.path, settings, guard)
        check_model("model_path", model.path, model_type, template, info)
    elif info is not None:  # a hub model: what it was given is checked all the same
        check_named_types(model_type, template, info)
    return CheckedRequest(data.value, model.value, out, dataset,
                          resolve_arguments(arguments or {}, settings, needs=needs, guard=guard),
                          is_file(out))  # fmt: skip


def check_swift_request(req: JobCreate, extra: dict[str, Any], info: SwiftInfo | None, *,
                        pending: bool) -> dict[str, Any]:  # fmt: skip
    """The kind and the ms-swift arguments of a create, each alone and together (no disk): its arguments
    converted. `pending`: the scheduler has published no ms-swift probe yet."""
    check_kind(req.kind, req.rlhf_type, info)
    arguments = check_arguments(req.kind, extra, info, pending=pending)
    check_packing(req.kind, req.rlhf_type, arguments, req.num_gpus, info)
    check_combinations(req.rlhf_type, arguments)
    if arguments.get("streaming") and req.training.max_steps is None:
        # (swift's own ValueError as the run starts, after the job's wait: hunt DH)
        raise Invalid("training.streaming needs training.max_steps: a streamed data set has no length, so ms-swift "
                      "cannot tell how many steps an epoch has and refuses to start without it")  # fmt: skip
    if req.kind == "rlhf" and req.rlhf_type is not None:
        t = req.training
        check_ref_model(req.rlhf_type, t.train_type, arguments)
        if req.rlhf_type == "kto":
            check_kto_batch(t.batch_size, t.gradient_accumulation_steps, req.num_gpus, arguments)
        elif req.rlhf_type == "grpo":
            check_grpo_batch(t.batch_size, t.gradient_accumulation_steps, req.num_gpus, arguments,
                             t.split_dataset_ratio)  # fmt: skip
    return arguments


def check_named_types(model_type: str | None, template: str | None, info: SwiftInfo) -> None:
    """training.model_type and training.template as the installed ms-swift knows them."""
    if model_type is not None and model_type not in info.types:
        raise Invalid(f"training.model_type '{model_type}' is not a model type of ms-swift {info.version}"
                      + _closest(model_type, info.types))  # fmt: skip
    if template is not None and template not in info.templates:
        raise Invalid(f"training.template '{template}' is not a template of ms-swift {info.version}"
                      + _closest(template, info.templates))  # fmt: skip


def own_files(settings: Settings) -> Guard:
    """No data set or model in the server's own files: its keys (API_KEYS_FILE, env/), Redis's data, its logs."""
    own = (("DATA_DIR", settings.DATA_DIR), ("LOG_DIR", settings.LOG_DIR), ("API_KEYS_FILE", settings.API_KEYS_FILE),
           ("the server's env/ folder", ENV_DIR))  # fmt: skip
    roots = (*settings.data_roots(), *settings.model_roots(), settings.OUTPUT_ROOT)
    return own_files_guard(tuple((name, path) for name, path in own if path is not None), tuple(roots))


def check_model_links(field: str, path: Path, settings: Settings, guard: Guard | None) -> None:
    """A model or adapter folder's files may not be links out of the roots, or into another owner's job folder
    (a checkpoint of theirs, file by file): swift loads what they lead to."""
    if path.is_dir():
        check_folder_links(field, path, settings.model_roots(), setting="MODEL_ROOTS or OUTPUT_ROOT", guard=guard,
                           fix="copy the files in instead")  # fmt: skip


def runs_inline(data_path: str, model_path: str, arguments: dict[str, Any], *, output_on_local_disk: bool,
                roots: frozenset[str] = frozenset()) -> bool:  # fmt: skip
    """May `check_request` run on the event loop? Yes when every data set and model is a hub id: all it then
    touches is the output folder's path (an lstat per folder level), and only when OUTPUT_ROOT is on a local
    disk (`utils.filesystems.on_local_disk`, found at start-up). Such a lookup takes microseconds, less than
    the hop to a thread and back (measured with benchmarks/bench_api.py: the hop alone cost a fifth of the
    route's throughput); a network mount that stalls must not stall the loop. `roots`: the roots' folder names
    (`path_sandbox.root_names`): a hub id in such a namespace is looked for on the disk."""
    if not output_on_local_disk:
        return False
    named: list[tuple[Any, bool]] = [(data_path, True), (model_path, False)]
    for name, value in arguments.items():
        if name in CACHED_ARGUMENTS:
            return False  # (always a folder on the disk)
        if name in DATA_ARGUMENTS or name in MODEL_ARGUMENTS:
            named += [(item, name in DATA_ARGUMENTS) for item in (value if isinstance(value, list) else [value])]
    return all(isinstance(v, str) and is_hub_id(v, data=data) and v.partition("/")[0] not in roots
               for v, data in named)  # fmt: skip


def resolve_arguments(arguments: dict[str, Any], settings: Settings, *, needs: Needs,
                      guard: Guard | None = None) -> dict[str, Any]:  # fmt: skip
    """The swift arguments that name data sets or models, sandboxed like data_path and model_path (a local
    data set is checked too); the rest as they are."""
    out = dict(arguments)
    for name, value in arguments.items():
        if name not in DATA_ARGUMENTS and name not in MODEL_ARGUMENTS:
            continue
        data = name in DATA_ARGUMENTS
        items = value if isinstance(value, list) else [value]
        resolved = []
        for i, item in enumerate(items):
            where = f"training.{name}" + (f"[{i}]" if isinstance(value, list) else "")
            if name in CACHED_ARGUMENTS:  # (no hub: ms-swift reads it with load_from_disk)
                r = resolve(where, item, settings.data_roots(), data=True, base=PROJECT_ROOT, setting="DATA_ROOTS",
                            guard=guard, hub=False)  # fmt: skip
                check_cached(where, r.path, settings.data_roots(), guard)
            elif data:
                r = resolve(where, item, settings.data_roots(), data=True, base=PROJECT_ROOT, setting="DATA_ROOTS",
                            guard=guard)  # fmt: skip
                if r.path is not None and r.path.is_file():
                    check_dataset(where, r.path, needs=needs, columns=renamed_columns(arguments))
                    check_media(where, r.path, settings.data_roots(), guard, media_columns(arguments))
                elif r.path is not None and r.path.is_dir():
                    check_folder_links(where, r.path, settings.data_roots(), setting="DATA_ROOTS", guard=guard)
                    check_data_folder(where, r.path)
                    check_media_folder(where, r.path, settings.data_roots(), guard, media_columns(arguments))
            else:
                r = resolve(where, item, settings.model_roots(), data=False, base=PROJECT_ROOT,
                            setting="MODEL_ROOTS or OUTPUT_ROOT", guard=guard)  # fmt: skip
                if r.path is not None:
                    check_model_links(where, r.path, settings, guard)
            resolved.append(r.value)
        out[name] = resolved if isinstance(value, list) else resolved[0]
    return out


# What `swift export --to_cached_dataset` writes, and `cached_dataset` / `cached_val_dataset` name.
CACHED_ARGUMENTS = frozenset({"cached_dataset", "cached_val_dataset"})


def check_cached(where: str, path: Path | None, roots: Sequence[Path], guard: Guard | None) -> None:
    """A cached data set: the train/ or val/ folder `swift export --to_cached_dataset` writes (Hugging Face's
    save_to_disk), which ms-swift reads with load_from_disk. Token ids in .arrow files: no media to check."""
    # (a DatasetDict's folder, dataset_dict.json, loads as a dict of splits, which ms-swift cannot select from)
    if path is None or not path.is_dir() or not (path / "state.json").is_file():
        raise Invalid(f"{where} is not a folder `swift export --to_cached_dataset` wrote: name its train/ or val/ "
                      "folder (the one holding state.json), inside DATA_ROOTS")  # fmt: skip
    check_folder_links(where, path, roots, setting="DATA_ROOTS", guard=guard)
    # load_from_disk reads the files state.json names, joined to the folder: an absolute name, or one with '..',
    # read any .arrow file of the host (and its error said whether a path existed).
    for name in _cached_files(where, path / "state.json"):
        if not name or "/" in name or "\\" in name or name in (".", "..") or not (path / name).is_file():
            raise Invalid(f"{where}: its state.json names the data file {name[:200]!r}, which is no file of that "
                          "folder: give the folder as swift export wrote it")  # fmt: skip


STATE_MAX = 1 << 20  # a state.json save_to_disk writes is a few hundred bytes a file


def _cached_files(where: str, state_file: Path) -> list[str]:
    try:
        with open_regular(state_file) as f:
            raw = f.read(STATE_MAX + 1)
        state = json.loads(raw) if len(raw) <= STATE_MAX else None
    except (OSError, ValueError):
        state = None
    files = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(files, list) or not files or len(files) > 100_000:
        raise Invalid(f"{where}: its state.json is not one save_to_disk wrote (no _data_files list): give the "
                      "folder as swift export wrote it")  # fmt: skip
    return [str(f.get("filename") or "") if isinstance(f, dict) else "" for f in files]
