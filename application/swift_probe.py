"""Run by the Python of ms-swift's own environment (not ours): prints what the installed ms-swift knows, as JSON.

    <swift's python> application/swift_probe.py

Stdlib plus ms-swift only, since it runs in that environment. It reports the version, the fields of the
argument dataclasses (name, a simple type, the default) and the model registry (which folder names ms-swift
recognises, and each model type's templates), so the server can check a request the way swift will.
Handles the 4.x layout (`swift.model`, `swift.arguments`) and the 3.x one (`swift.llm`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib
import importlib.metadata
import io
import json
import sys
import typing
from typing import Any

# 3.x names the sft class TrainArguments.
ARGUMENT_CLASSES = ("SftArguments", "TrainArguments", "PretrainArguments", "RLHFArguments", "ExportArguments")


def _import_first(*names: str) -> Any:
    for name in names:
        with contextlib.suppress(Exception):
            return importlib.import_module(name)
    return None


def describe_type(tp: Any) -> dict[str, Any]:
    """A small, JSON-able description of a dataclass field's type."""
    optional = False
    origin = typing.get_origin(tp)
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) != len(typing.get_args(tp))
        if len(args) == 1:
            out = describe_type(args[0])
            out["optional"] = out.get("optional", False) or optional
            return out
        kinds = [describe_type(a)["kind"] for a in args]
        # Union[str, List[str]] and the like: a list or one item of it.
        if "list" in kinds:
            listed = next(describe_type(a) for a in args if describe_type(a)["kind"] == "list")
            return {**listed, "optional": optional}
        if "dict" in kinds:
            return {"kind": "dict", "optional": optional}
        if "float" in kinds:
            return {"kind": "float", "optional": optional}
        return {"kind": kinds[0] if len(set(kinds)) == 1 else "str", "optional": optional}
    if origin is typing.Literal:
        choices = [c for c in typing.get_args(tp) if c is not None]
        return {"kind": "literal", "choices": choices, "optional": None in typing.get_args(tp)}
    if origin in (list, tuple, set) or tp in (list, tuple, set):
        item_args = typing.get_args(tp)
        item = describe_type(item_args[0])["kind"] if item_args else "str"
        return {"kind": "list", "item": item, "optional": optional}
    if origin is dict or tp is dict:
        return {"kind": "dict", "optional": optional}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"kind": "literal", "choices": [m.value for m in tp], "optional": False}
    simple = {bool: "bool", int: "int", float: "float", str: "str"}
    if tp in simple:
        return {"kind": simple[tp], "optional": False}
    if isinstance(tp, str):  # postponed annotations
        low = tp.lower()
        for word in ("bool", "int", "float", "str"):
            if low == word or low == f"optional[{word}]":
                return {"kind": word, "optional": low.startswith("optional")}
    return {"kind": "any", "optional": True}


def _default(f: Any) -> Any:
    value = f.default
    if value is dataclasses.MISSING:
        if f.default_factory is not dataclasses.MISSING:
            try:
                value = f.default_factory()
            except Exception:
                return None
        else:
            return None
    if isinstance(value, enum.Enum):
        value = value.value
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return str(value)
    return value


def enforced_choices() -> tuple[Any, dict[str, list[Any]]]:
    """transformers' TrainingArguments and the fields it annotates `SomeEnum | str` (lr_scheduler_type, optim,
    the *_strategy ones): its __post_init__ converts them with the Enum, so a value outside it fails there,
    after the job's wait, even where ms-swift re-annotates the field as a plain `str`."""
    cls = getattr(_import_first("transformers"), "TrainingArguments", None)
    if cls is None:
        return None, {}
    hints: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        hints = typing.get_type_hints(cls)
    out: dict[str, list[Any]] = {}
    for name, tp in hints.items():
        args = typing.get_args(tp)
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if len(enums) == 1 and str in args:
            out[name] = [m.value for m in enums[0]]
    return cls, out


def cli_actions(cls: Any) -> dict[str, Any]:
    """The parser actions swift's own parse_args makes for a class (transformers' HfArgumentParser, under
    ms-swift's type-hint patch where it has one), by field name; none when it cannot be built."""
    parser_cls = getattr(_import_first("transformers"), "HfArgumentParser", None)
    patch = getattr(_import_first("swift.utils.utils"), "_patch_get_type_hints", None)
    if parser_cls is None:
        return {}
    try:
        with patch() if patch is not None else contextlib.nullcontext():
            parser = parser_cls([cls])
    except Exception:
        return {}
    return {a.dest: a for a in parser._actions}


def as_parsed(described: dict[str, Any], action: Any) -> dict[str, Any]:
    """The field as the command line takes it, which the annotation can overstate: choices in its metadata, one
    value where the annotation allows a list, a bool parser for `str | bool`, or a type no text converts to (a
    `dict`, a config dataclass): "unparsable", which the server refuses."""
    tp, kind, optional = getattr(action, "type", None), described["kind"], described.get("optional", False)
    if getattr(tp, "__name__", "") == "string_to_bool":
        return {"kind": "bool", "optional": optional}
    if kind == "list" and getattr(action, "nargs", None) in (None, "?"):
        return {"kind": described.get("item", "str"), "optional": optional}
    if isinstance(tp, type) and issubclass(tp, enum.Enum) and kind == "list":
        return {**described, "item_choices": [m.value for m in tp]}
    if tp is dict or typing.get_origin(tp) is dict or (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
        return {"kind": "unparsable", "optional": True}
    choices = getattr(action, "choices", None)
    if choices and kind not in ("literal", "list"):
        values = [c.value if isinstance(c, enum.Enum) else c for c in choices]
        if all(isinstance(v, (str, int, float)) for v in values):
            return {"kind": "literal", "choices": values, "optional": optional}
    return described


def arguments() -> dict[str, dict[str, Any]]:
    module = _import_first("swift.arguments", "swift.llm.argument", "swift.llm")
    out: dict[str, dict[str, Any]] = {}
    if module is None:
        return out
    trainer_args, enforced = enforced_choices()
    for cls_name in ARGUMENT_CLASSES:
        cls = getattr(module, cls_name, None)
        if cls is None or not dataclasses.is_dataclass(cls):
            continue
        hints: dict[str, Any] = {}
        with contextlib.suppress(Exception):
            hints = typing.get_type_hints(cls)
        fields = {}
        actions = cli_actions(cls)
        for f in dataclasses.fields(cls):
            if f.name.startswith("_") or not f.init:
                continue
            described = describe_type(hints.get(f.name, f.type))
            if f.name in actions:
                described = as_parsed(described, actions[f.name])
            default = _default(f)
            # `x: int = None` is optional in practice whatever the annotation says.
            described["optional"] = described.get("optional", False) or default is None
            if f.name in enforced and isinstance(cls, type) and issubclass(cls, trainer_args):
                described = {"kind": "literal", "choices": enforced[f.name], "optional": described["optional"]}
            fields[f.name] = {**described, "default": default}
        out[cls_name] = fields
    return out


def models() -> dict[str, Any]:
    meta_mod = _import_first("swift.model.model_meta", "swift.model.register", "swift.llm.model.register")
    tmpl_mod = _import_first("swift.template", "swift.llm.template", "swift.llm")
    mapping = getattr(meta_mod, "MODEL_MAPPING", None) or {}
    names: dict[str, list[Any]] = {}
    types: dict[str, Any] = {}
    for model_type, meta in mapping.items():
        types[model_type] = {
            "template": getattr(meta, "template", None) if isinstance(getattr(meta, "template", None), str) else None,
            "candidates": list(getattr(meta, "candidate_templates", None) or []),
            "architectures": list(getattr(meta, "architectures", None) or []),
            "multimodal": bool(getattr(meta, "is_multimodal", False)),
        }
        for group in getattr(meta, "model_groups", None) or []:
            template = getattr(group, "template", None)
            for model in getattr(group, "models", None) or []:
                for key in ("ms_model_id", "hf_model_id", "model_path"):
                    value = getattr(model, key, None)
                    if isinstance(value, str) and value:
                        name = value.rsplit("/", 1)[-1].lower()
                        names.setdefault(name, [model_type, template if isinstance(template, str) else None])
    templates = sorted(getattr(tmpl_mod, "TEMPLATE_MAPPING", None) or {})
    return {"names": names, "types": types, "templates": templates}


def main() -> int:
    # ms-swift logs to stdout while it imports: keep our JSON the only thing on it.
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        version = importlib.metadata.version("ms-swift")
        data = {"version": version, "arguments": arguments(), "models": models()}
    sys.stdout.write(json.dumps(data, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
