"""Checks before a job takes a queue slot: a job that cannot start should fail in milliseconds, not after hours.

* A local data set must be a readable .jsonl, .json or .csv file whose first rows are a format ms-swift's
  preprocessors accept (`messages`/`conversations`, query/response-style columns, alpaca's instruction/input/
  output). The message names the file, the row and what is wrong. Its row count is recorded for the scheduler.
* A local model folder needs `config.json` and tokenizer files; when the installed ms-swift cannot tell the
  model's type or template from the folder (it matches the folder's name against its registry, then the
  architecture in config.json), the request must name them.

Synchronous and bounded (only the first bytes are parsed; counting rows reads at most COUNT_MAX_BYTES):
callers run it in a thread, unless `runs_inline` says all it would touch is the output folder's path.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from application.config import PROJECT_ROOT, Settings
from application.exceptions import Invalid
from application.services.media_refs import check_media, check_media_folder, media_columns
from application.services.path_sandbox import (
    Guard,
    check_folder_links,
    is_file,
    is_hub_id,
    resolve,
    resolve_output_dir,
)
from application.services.swift_arguments import DATA_ARGUMENTS, MODEL_ARGUMENTS, PREFERENCE_TYPES
from application.services.swift_info import SwiftInfo

HEAD_BYTES = 8 << 20  # rows checked come from the first 8 MiB
SAMPLE_ROWS = 20
COUNT_MAX_BYTES = 2 << 30  # exact row counts up to 2 GiB; past that an estimate
JSON_ARRAY_MAX_BYTES = 64 << 20
MESSAGE_KEYS = ("messages", "conversations", "conversation")
# ms-swift's ResponsePreprocessor maps these columns to query/response (swift/dataset/preprocessor/core.py).
QUERY_KEYS = ("query", "prompt", "input", "instruction", "question", "problem")
RESPONSE_KEYS = ("response", "answer", "output", "targets", "target", "answer_key", "answers", "solution", "text",
                 "completion", "content")  # fmt: skip
REJECTED_KEYS = ("rejected_response", "rejected_messages")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model",
                   "qwen.tiktoken", "tiktoken.model")  # fmt: skip
FORMATS_HELP = (
    "messages (a list of {role, content}), conversations ({from, value}), query/response, "
    "instruction/input/output, or a text/response column"
)


@dataclass(frozen=True)
class DatasetInfo:
    rows: int | None
    rows_exact: bool
    format: str


# What each row must hold beyond a conversation: a rejected answer (preference training: dpo, orpo, simpo, cpo,
# rm), a label (kto), or either (an upload for rlhf, whose type is not known yet).
Needs = Literal["rejected", "label", "either"] | None


def data_needs(kind: str, rlhf_type: str | None) -> Needs:
    """What the rows of a job's data sets must hold for its kind of training."""
    if kind != "rlhf":
        return None
    return "rejected" if rlhf_type in PREFERENCE_TYPES else "label" if rlhf_type == "kto" else None


def label_kind(label: Any, text: bool) -> str | None:
    """What a KTO label is ("bool" or "number"), or None when ms-swift could not sum it: true/false or 1/0; in
    a CSV file (`text`) those words, which the CSV reader turns into booleans or numbers when a column holds
    one kind only (a column mixing them stays text)."""
    if text:
        word = label.strip().lower() if isinstance(label, str) else None
        return "bool" if word in ("true", "false") else "number" if word in ("1", "0") else None
    if isinstance(label, bool):
        return "bool"
    return "number" if type(label) is int and label in (0, 1) else None


def _row_format(row: Any, where: str, *, needs: Needs, text: bool = False) -> str:
    if not isinstance(row, dict):
        raise Invalid(f"{where}: each row must be a JSON object, got {type(row).__name__}")
    fmt = None
    for key in MESSAGE_KEYS:
        if key in row:
            _check_messages(row[key], f"{where}: '{key}'")
            fmt = "messages"
            break
    if fmt is None:
        if any(k in row for k in RESPONSE_KEYS):
            fmt = "query/response"
        elif "instruction" in row and "input" in row:
            fmt = "alpaca"
        else:
            found = ", ".join(sorted(map(str, row))[:12]) or "none"
            raise Invalid(f"{where}: no columns ms-swift can train on (found: {found}); use {FORMATS_HELP}")
    rejected = any(k in row for k in REJECTED_KEYS)
    labelled = label_kind(row.get("label"), text) is not None
    if needs == "rejected" and not rejected:
        raise Invalid(f"{where}: preference training needs a rejected answer per row: add 'rejected_response' "
                      "(or 'rejected_messages')")  # fmt: skip
    if needs == "label" and not labelled:
        raise Invalid(f"{where}: KTO needs a 'label' per row: true for a desirable answer, false for an "
                      "undesirable one")  # fmt: skip
    if needs == "either" and not (rejected or labelled):
        raise Invalid(f"{where}: rlhf data needs a rejected answer per row ('rejected_response' or "
                      "'rejected_messages'), or a 'label' true/false for KTO")  # fmt: skip
    return fmt


def _check_messages(value: Any, where: str) -> None:
    if not isinstance(value, list) or not value:
        raise Invalid(f"{where} must be a non-empty list of messages")
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise Invalid(f'{where}[{i}] must be an object such as {{"role": "user", "content": "..."}}')
        if not ({"role", "content"} <= msg.keys() or {"from", "value"} <= msg.keys()):
            raise Invalid(f"{where}[{i}] needs 'role' and 'content' (or 'from' and 'value')")


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(HEAD_BYTES)


def _jsonl_rows(head: bytes, complete: bool) -> Iterator[tuple[int, Any]]:
    lines = head.split(b"\n")
    if not complete:
        lines = lines[:-1]  # the last one may be cut by the 8 MiB read
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            yield number, json.loads(raw)
        except ValueError as exc:
            raise Invalid(f"line {number} is not valid JSON ({exc})") from None
        except RecursionError:  # (Python's decoder recurses per level: a 500 with a traceback, before)
            raise Invalid(f"line {number} is nested too deeply to be a data set row") from None


def _json_array_rows(head: bytes, complete: bool) -> Iterator[tuple[int, Any]]:
    text = head.decode("utf-8", errors="replace")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    n = 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            value, pos = decoder.raw_decode(text, pos)
        except ValueError as exc:
            if not complete and n > 0:
                return  # cut by the 8 MiB read
            raise Invalid(f"element {n + 1} of the JSON array is not valid JSON ({exc})") from None
        except RecursionError:
            raise Invalid(f"element {n + 1} of the JSON array is nested too deeply to be a data set row") from None
        n += 1
        yield n, value


def _csv_rows(head: bytes, complete: bool) -> Iterator[tuple[int, Any]]:
    text = head.decode("utf-8-sig", errors="replace")
    if not complete:
        text = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames:
        raise Invalid("the CSV file has no header row")
    yield from enumerate(reader, start=2)


# A newline that a blank line (spaces at most) follows: blank lines are not rows (ms-swift skips them).
_BLANK_NEXT = re.compile(rb"\n(?=[ \t\r\f\v]*\n)")


def _count_lines(path: Path, size: int) -> tuple[int, bool]:
    """Lines with something on them (a last line without a newline counts too); an estimate past
    COUNT_MAX_BYTES. Read in blocks: the line a block begins with may have begun in the blocks before."""
    count, read, open_row = 0, 0, False  # open_row: what the blocks before ended with has content
    with open(path, "rb") as f:
        while read < COUNT_MAX_BYTES:
            block = f.read(1 << 20)
            if not block:
                break
            read += len(block)
            first = block.find(b"\n")
            if first == -1:
                open_row = open_row or bool(block.strip())
                continue
            # Every line this block ends, less the blank ones: the first (its start may be in the blocks before)
            # and those after each newline.
            blank_first = not open_row and not block[:first].strip()
            count += block.count(b"\n") - blank_first - len(_BLANK_NEXT.findall(block))
            open_row = bool(block[block.rfind(b"\n") + 1 :].strip())
    if read >= size:
        return count + open_row, True
    return int(count * size / max(read, 1)), False


def check_dataset(field: str, path: Path, *, needs: Needs = None) -> DatasetInfo:
    """Raise Invalid naming the file and row when ms-swift could not train on it; else its format and size."""
    name = path.name
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise Invalid(f"{field} '{name}': ms-swift data sets here must be .jsonl, .json or .csv files")
    try:
        if not path.is_file():
            raise Invalid(f"{field} '{path}' is not a file")
        size = path.stat().st_size
        head = _head(path)
    except PermissionError:
        raise Invalid(f"{field} '{path}' cannot be read by the server (permissions)") from None
    except OSError as exc:
        raise Invalid(f"{field} '{path}' cannot be read ({exc.strerror})") from None
    if size == 0 or not head.strip():
        raise Invalid(f"{field} '{path}' is empty")
    complete = len(head) >= size
    stripped = head.lstrip()
    rows: Iterator[tuple[int, Any]]
    if suffix == ".csv":
        rows, unit = _csv_rows(head, complete), "line"
    elif suffix == ".json" and stripped.startswith(b"["):
        rows, unit = _json_array_rows(head, complete), "element"
    else:
        rows, unit = _jsonl_rows(head, complete), "line"
    formats: set[str] = set()
    labels: set[str | None] = set()
    seen = 0
    try:
        for number, row in rows:
            formats.add(_row_format(row, f"{unit} {number}", needs=needs, text=suffix == ".csv"))
            if suffix == ".csv" and needs in ("label", "either") and isinstance(row, dict) and "label" in row:
                labels.add(label_kind(row["label"], True))
                if {"bool", "number"} <= labels:
                    raise Invalid(f"{unit} {number}: its 'label' column mixes true/false with 1/0: the CSV reader "
                                  "then keeps it as text, which KTO cannot sum; use one of them")  # fmt: skip
            seen += 1
            if seen >= SAMPLE_ROWS:
                break
    except Invalid as exc:
        raise Invalid(f"{field} '{path}': {exc.detail}") from None
    if seen == 0:
        raise Invalid(f"{field} '{path}': no rows found in its first {HEAD_BYTES >> 20} MiB")
    fmt = formats.pop() if len(formats) == 1 else "mixed"
    if suffix == ".json" and stripped.startswith(b"["):
        if size > JSON_ARRAY_MAX_BYTES:
            return DatasetInfo(None, False, fmt)
        try:
            with open(path, "rb") as f:
                length = _array_length(f.read().decode("utf-8"))
        except (OSError, ValueError) as exc:
            raise Invalid(f"{field} '{path}' is not a valid JSON array ({exc})") from None
        except RecursionError:
            raise Invalid(f"{field} '{path}' is nested too deeply to be a data set") from None
        return DatasetInfo(length, True, fmt)
    try:
        count, exact = _count_lines(path, size)
    except OSError as exc:  # opened again to count: the file may have gone since its head was read
        raise Invalid(f"{field} '{path}' cannot be read ({exc.strerror})") from None
    if suffix == ".csv":
        count = max(0, count - 1)  # the header (multi-line quoted fields make this approximate)
    return DatasetInfo(count, exact, fmt)


_BLANK = re.compile(r"[ \t\n\r]*")


def _array_length(text: str) -> int:
    """The rows of a JSON array, decoded one at a time: json.loads of the whole holds the GIL throughout (3 s for
    60 MB), and this runs in a thread beside the event loop, which it stalled that long. ValueError if the text
    is not one JSON array."""
    decoder = json.JSONDecoder()
    at = _BLANK.match(text).end()  # type: ignore[union-attr]
    if text[at : at + 1] != "[":
        raise ValueError("it does not start with '['")
    at = _BLANK.match(text, at + 1).end()  # type: ignore[union-attr]
    rows = 0
    if text[at : at + 1] != "]":
        while True:
            _, at = decoder.raw_decode(text, at)
            rows += 1
            at = _BLANK.match(text, at).end()  # type: ignore[union-attr]
            mark = text[at : at + 1]
            if mark == "]":
                break
            if mark != ",":
                raise ValueError(f"',' or ']' expected at character {at}")
            at = _BLANK.match(text, at + 1).end()  # type: ignore[union-attr]
    if _BLANK.match(text, at + 1).end() != len(text):  # type: ignore[union-attr]
        raise ValueError(f"extra data after the array, at character {at + 1}")
    return rows


def _read_json(path: Path) -> Any:
    try:
        if path.stat().st_size > 16 << 20:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None


def _closest(word: str, choices: Any) -> str:
    near = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(near)}?)" if near else ""


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
    if model_type is not None and model_type not in info.types:
        raise Invalid(f"training.model_type '{model_type}' is not a model type of ms-swift {info.version}"
                      + _closest(model_type, info.types))  # fmt: skip
    if template is not None and template not in info.templates:
        raise Invalid(f"training.template '{template}' is not a template of ms-swift {info.version}"
                      + _closest(template, info.templates))  # fmt: skip
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
            raise Invalid(
                f"ms-swift cannot tell the model type of '{path.name}' from its folder name, and its architecture "
                f"{arch or '(none)'} fits several: set training.model_type (one of {', '.join(candidates)}) "
                "and training.template"
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
    """The path sandbox (with `guard`, see path_sandbox.Guard), then the data set and model checks.
    Synchronous (touches the disk): run it in a thread (a guard may be called only there)."""
    out = resolve_output_dir(output_dir, settings.OUTPUT_ROOT)
    data = resolve("data_path", data_path, settings.data_roots(), data=True, base=PROJECT_ROOT,
                   setting="DATA_ROOTS", guard=guard)  # fmt: skip
    model = resolve("model_path", model_path, settings.model_roots(), data=False, base=PROJECT_ROOT,
                    setting="MODEL_ROOTS or OUTPUT_ROOT", guard=guard)  # fmt: skip
    dataset = check_dataset("data_path", data.path, needs=needs) if data.path is not None else None
    if data.path is not None:
        check_media("data_path", data.path, settings.data_roots(), guard, media_columns(arguments or {}))
    if model.path is not None:
        check_model_links("model_path", model.path, settings, guard)
        check_model("model_path", model.path, model_type, template, info)
    return CheckedRequest(data.value, model.value, out, dataset,
                          resolve_arguments(arguments or {}, settings, needs=needs, guard=guard),
                          is_file(out))  # fmt: skip


def check_model_links(field: str, path: Path, settings: Settings, guard: Guard | None) -> None:
    """A model or adapter folder's files may not be links out of the roots, or into another owner's job folder
    (a checkpoint of theirs, file by file): swift loads what they lead to."""
    if path.is_dir():
        check_folder_links(field, path, settings.model_roots(), setting="MODEL_ROOTS or OUTPUT_ROOT", guard=guard,
                           fix="copy the files in instead")  # fmt: skip


def runs_inline(data_path: str, model_path: str, arguments: dict[str, Any], *, output_on_local_disk: bool) -> bool:
    """May `check_request` run on the event loop? Yes when every data set and model is a hub id: all it then
    touches is the output folder's path (an lstat per folder level), and only when OUTPUT_ROOT is on a local
    disk (`utils.filesystems.on_local_disk`, found at start-up). Such a lookup takes microseconds, less than
    the hop to a thread and back (measured with benchmarks/bench_api.py: the hop alone cost a fifth of the
    route's throughput); a network mount that stalls must not stall the loop."""
    if not output_on_local_disk:
        return False
    named: list[tuple[Any, bool]] = [(data_path, True), (model_path, False)]
    for name, value in arguments.items():
        if name in DATA_ARGUMENTS or name in MODEL_ARGUMENTS:
            named += [(item, name in DATA_ARGUMENTS) for item in (value if isinstance(value, list) else [value])]
    return all(isinstance(v, str) and is_hub_id(v, data=data) for v, data in named)


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
            if data:
                r = resolve(where, item, settings.data_roots(), data=True, base=PROJECT_ROOT, setting="DATA_ROOTS",
                            guard=guard)  # fmt: skip
                if r.path is not None and r.path.is_file():
                    check_dataset(where, r.path, needs=None if name == "cached_dataset" else needs)
                    check_media(where, r.path, settings.data_roots(), guard, media_columns(arguments))
                elif r.path is not None and r.path.is_dir():
                    check_folder_links(where, r.path, settings.data_roots(), setting="DATA_ROOTS", guard=guard)
                    check_media_folder(where, r.path, settings.data_roots(), guard, media_columns(arguments))
            else:
                r = resolve(where, item, settings.model_roots(), data=False, base=PROJECT_ROOT,
                            setting="MODEL_ROOTS or OUTPUT_ROOT", guard=guard)  # fmt: skip
                if r.path is not None:
                    check_model_links(where, r.path, settings, guard)
            resolved.append(r.value)
        out[name] = resolved if isinstance(value, list) else resolved[0]
    return out
