"""What each row of a data set must hold for ms-swift to train on it: a format its preprocessors accept
(`messages`/`conversations`, query/response-style columns, alpaca's instruction/input/output), after the `columns`
argument's renames, with what the kind of training needs (a rejected answer, a KTO label, or a prompt alone).
`datasets` reads the file and hands each sampled row here.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from typing import Any, Literal

from application.exceptions import Invalid
from application.services.swift_arguments import PREFERENCE_TYPES

MESSAGE_KEYS = ("messages", "conversations", "conversation")
# ms-swift's ResponsePreprocessor maps these columns to query/response (swift/dataset/preprocessor/core.py).
QUERY_KEYS = ("query", "prompt", "input", "instruction", "question", "problem")
RESPONSE_KEYS = ("response", "answer", "output", "targets", "target", "answer_key", "answers", "solution", "text",
                 "completion", "content")  # fmt: skip
REJECTED_KEYS = ("rejected_response", "rejected_messages")
FORMATS_HELP = (
    "messages (a list of {role, content}), conversations ({from, value}), query/response, "
    "instruction/input/output, or a text/response column"
)


# What each row must hold beyond a conversation: a rejected answer (preference training: dpo, orpo, simpo, cpo,
# rm), a label (kto), or either (an upload for rlhf, whose type is not known yet: a prompt alone passes too);
# "prompt": a prompt alone is a row (GRPO and PPO write their own answers).
Needs = Literal["rejected", "label", "either", "prompt"] | None
PROMPT_TYPES = frozenset({"grpo", "ppo"})


def data_needs(kind: str, rlhf_type: str | None) -> Needs:
    """What the rows of a job's data sets must hold for its kind of training."""
    if kind != "rlhf":
        return None
    if rlhf_type in PROMPT_TYPES:
        return "prompt"
    return "rejected" if rlhf_type in PREFERENCE_TYPES else "label" if rlhf_type == "kto" else None


def renamed_columns(arguments: Mapping[str, Any]) -> dict[str, str]:
    """The `columns` argument (old name -> new name) as ms-swift applies it before reading a row: a name
    matched without regard to case, two columns renamed to one name left alone (its safe_rename_columns)."""
    mapped = arguments.get("columns")
    if isinstance(mapped, str):  # (as the arguments' check leaves it: JSON text)
        try:
            mapped = json.loads(mapped)
        except ValueError:
            return {}
    if not isinstance(mapped, dict):
        return {}
    return {str(k).lower(): v for k, v in mapped.items() if isinstance(v, str)}


def renamed(row: dict[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    found = {k: columns[k.lower()] for k in row if isinstance(k, str) and k.lower() in columns}
    targets = Counter(found.values())
    safe = {k: v for k, v in found.items() if targets[v] == 1 and k != v}
    return {safe.get(k, k): v for k, v in row.items()} if safe else row


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


def row_format(row: Any, where: str, *, needs: Needs, text: bool = False,
                columns: Mapping[str, str] | None = None) -> str:  # fmt: skip
    if not isinstance(row, dict):
        raise Invalid(f"{where}: each row must be a JSON object, got {type(row).__name__}")
    if columns:
        row = renamed(row, columns)
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
        elif needs in ("prompt", "either") and any(k in row for k in QUERY_KEYS):
            fmt = "prompt"
        else:
            found = ", ".join(sorted(map(str, row))[:12]) or "none"
            raise Invalid(f"{where}: no columns ms-swift can train on (found: {found}); use {FORMATS_HELP}")
    rejected = any(k in row for k in REJECTED_KEYS)
    labelled = label_kind(row.get("label"), text) is not None
    if needs == "rejected" and not rejected:
        raise Invalid(f"{where}: preference training needs a rejected answer per row: add 'rejected_response' "
                      "(or 'rejected_messages')")  # fmt: skip
    if "rejected_response" in row and (why := _unusable_rejection(row, fmt, text)):
        # ms-swift drops such a row ("There are errors in the dataset, the data will be deleted"); with none left
        # the run failed on a bare ZeroDivisionError after its wait.
        raise Invalid(f"{where}: its 'rejected_response' {why}: ms-swift drops such a row; give a different answer")
    if needs == "label" and not labelled:
        raise Invalid(f"{where}: KTO needs a 'label' per row: true for a desirable answer, false for an "
                      "undesirable one")  # fmt: skip
    if needs == "either" and not (rejected or labelled or _has_prompt(row)):
        raise Invalid(f"{where}: rlhf data needs a rejected answer per row ('rejected_response' or "
                      "'rejected_messages'), a 'label' true/false for KTO, or a prompt alone for GRPO/PPO")  # fmt: skip
    return fmt


def _unusable_rejection(row: dict[str, Any], fmt: str, text: bool) -> str | None:
    """Why ms-swift would drop a row for its rejected_response (its preprocessor's _check_rejected_response): null
    (in a CSV file (`text`), an empty cell, which its loader reads as null), or the chosen answer itself."""
    value = row["rejected_response"]
    if value is None or (text and value == ""):
        return "is null" if value is None else "is empty"
    if not isinstance(value, str):
        return None
    if fmt == "messages":
        turns = next(row[k] for k in MESSAGE_KEYS if k in row)
        last = turns[-1] if isinstance(turns, list) and turns and isinstance(turns[-1], dict) else {}
        chosen = last.get("content", last.get("value"))
    else:
        chosen = next((row[k] for k in RESPONSE_KEYS if k in row), None)
    return "is the chosen answer itself" if value == chosen else None


def _has_prompt(row: dict[str, Any]) -> bool:
    """A prompt GRPO/PPO could answer: a query-like column (besides a solution, which GRPO's rewards read), or
    a conversation that ends with the user's turn."""
    if any(k in row for k in QUERY_KEYS):
        return True
    turns = next((row[k] for k in MESSAGE_KEYS if k in row), None)
    last = turns[-1] if isinstance(turns, list) and turns and isinstance(turns[-1], dict) else {}
    return last.get("role", last.get("from")) in ("user", "human")


def _check_messages(value: Any, where: str) -> None:
    if not isinstance(value, list) or not value:
        raise Invalid(f"{where} must be a non-empty list of messages")
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise Invalid(f'{where}[{i}] must be an object such as {{"role": "user", "content": "..."}}')
        if not ({"role", "content"} <= msg.keys() or {"from", "value"} <= msg.keys()):
            raise Invalid(f"{where}[{i}] needs 'role' and 'content' (or 'from' and 'value')")
