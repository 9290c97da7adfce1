"""What each row of a data set must hold for ms-swift to train on it: a format its preprocessors accept
(`messages`/`conversations`, query/response-style columns, alpaca's instruction/input/output), after the `columns`
argument's renames, with what the kind of training needs (a rejected answer, a KTO label, or a prompt alone).
`datasets` reads the file and hands each sampled row here.
"""

from __future__ import annotations

import ast
import json
import re
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
# The roles ms-swift's MessagesPreprocessor takes, as written: it maps human/gpt/bot, function_call and observation
# to its own, and asserts the rest (swift/dataset/preprocessor/core.py _check_messages: every row of another
# role is dropped, and with none left the run failed after its wait: hunt BK).
ROLES = frozenset({"system", "user", "human", "assistant", "gpt", "bot", "tool", "tool_call", "tool_response",
                   "function_call", "function-call", "function_response", "function-response", "observation",
                   "observations"})  # fmt: skip
ANSWER_ROLES = frozenset({"assistant", "gpt", "bot"})
TEXT_ROLES = frozenset({"system", "user", "human", *ANSWER_ROLES})
SYSTEM_KEYS = ("system", "system_prompt")
# What ms-swift's preprocessors rename to query, response and system (without regard to case): a name is renamed
# when it is the only one of its target's in the row; of two or more, none is, and the column named as the target
# itself is the one used (its safe_rename_columns). The used ones its template encodes as text: a number, a
# true/false or an object there failed the run ('int' object is not iterable: hunt BK; a second, unused answer
# column of numbers trained: review BO). Not the answers of GRPO or PPO, which only reward functions read.
TARGETS = (("query", QUERY_KEYS), ("response", RESPONSE_KEYS), ("system", SYSTEM_KEYS))
ANY_CASE_KEYS = frozenset({*QUERY_KEYS, *RESPONSE_KEYS, *SYSTEM_KEYS})
CSV_TYPED_ROWS = 10_000  # datasets' CSV reader takes a column's type from its first batch of this many rows
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_BOOL_WORDS = frozenset({"True", "False", "TRUE", "FALSE", "true", "false"})
MAX_MESSAGES_TEXT = 1 << 20
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
    if text:  # (as written: pandas keeps " true" as text)
        word = label.lower() if isinstance(label, str) else None
        if word in ("true", "false"):
            return "bool"
        return "number" if word is not None and _NUMBER.fullmatch(word) and float(word) in (0, 1) else None
    if isinstance(label, bool):
        return "bool"
    return "number" if type(label) in (int, float) and label in (0, 1) else None


def row_format(row: Any, where: str, *, needs: Needs, text: bool = False,
                columns: Mapping[str, str] | None = None) -> str:  # fmt: skip
    if not isinstance(row, dict):
        raise Invalid(f"{where}: each row must be a JSON object, got {type(row).__name__}")
    if columns:
        row = renamed(row, columns)
    alpaca = "instruction" in row and "input" in row  # (ms-swift chooses alpaca by these names as written)
    row = _lower_keys(row, where)
    fmt = None
    for key in MESSAGE_KEYS:
        if key in row:
            row = {**row, key: _repaired(row[key], f"{where}: '{key}'")}
            _check_messages(row[key], f"{where}: '{key}'", needs=needs)
            fmt = "messages"
            break
    if fmt is None and alpaca and not text:
        instruction, given = row["instruction"], row["input"]
        if not (instruction and given) and not isinstance(instruction or given, str):
            # (alpaca joins the two as text only when both are given; else the one given must be text)
            raise Invalid(f"{where}: its 'instruction' and 'input' give no text query: ms-swift takes text there")
    if needs != "either":  # (an rlhf upload, its kind unknown: checked with the job that names it)
        used, clashes = used_columns(row, needs, messages=fmt == "messages", alpaca=alpaca)
        for target, names in clashes:
            what = "question" if target == "query" else "answer"
            raise Invalid(f"{where}: columns {', '.join(repr(n) for n in names)} all name the {what} to ms-swift, "
                          f"which then takes none of them as the {what}: keep one, or rename the others with "
                          "training.columns")  # fmt: skip
        for key, target in [] if text else used:  # (a CSV's values are all text here: see CsvColumns)
            if (kind := _json_kind(row[key], target)) not in ("text", "none"):
                hint = " (a conversation goes in a 'messages' column)" if kind == "a list" else ""
                raise Invalid(f"{where}: its '{key}' is {kind}: ms-swift takes text there; quote it{hint}")
    if fmt is None:
        if any(k in row for k in RESPONSE_KEYS):
            fmt = "query/response"
        elif "instruction" in row and "input" in row:
            fmt = "alpaca"
        elif needs in ("prompt", "either") and any(k in row for k in QUERY_KEYS):
            fmt = "prompt"
        else:
            found = ", ".join(sorted(map(str, row))[:12]) or "none"
            # (the common chosen/rejected preference file, as many hubs have it, of texts or, trl's, of
            # conversations: hunt DH, review DL)
            pairs = ""
            if {"chosen", "rejected"} <= set(row):
                chats = isinstance(row["chosen"], list)
                to_chosen = "messages" if chats else "response"
                to_rejected = f"rejected_{to_chosen}"
                pairs = (f' (a chosen/rejected file: training.columns {{"chosen": "{to_chosen}", "rejected": '
                         f'"{to_rejected}"}} names them as ms-swift reads them)')  # fmt: skip
            raise Invalid(f"{where}: no columns ms-swift can train on (found: {found}); use {FORMATS_HELP}{pairs}")
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
    if needs in ("label", "rejected") and fmt == "messages":
        last = next(row[k] for k in MESSAGE_KEYS if k in row)[-1]
        if last.get("role", last.get("from")) not in ANSWER_ROLES:
            # (KTO's KL pairing asserts it, outside the per-row guard: one such row failed the whole run. DPO and
            # RM trained on such rows to the end with no chosen answer at all: logps/chosen 0, rewards 0: hunt DH)
            what = "the answer it labels" if needs == "label" else "the chosen answer"
            raise Invalid(f"{where}: {'KTO' if needs == 'label' else 'preference training'} takes a conversation's "
                          f"last turn as {what}: end it with the assistant's turn")  # fmt: skip
        if needs == "rejected" and not last.get("content", last.get("value")):
            raise Invalid(f"{where}: preference training takes a conversation's last turn as the chosen answer, "
                          "and that turn is empty: give the answer's text")  # fmt: skip
    if needs == "either" and not (rejected or labelled or _has_prompt(row)):
        raise Invalid(f"{where}: rlhf data needs a rejected answer per row ('rejected_response' or "
                      "'rejected_messages'), a 'label' true/false for KTO, or a prompt alone for GRPO/PPO")  # fmt: skip
    return fmt


def _unusable_rejection(row: dict[str, Any], fmt: str, text: bool) -> str | None:
    """Why ms-swift would drop a row for its rejected_response (its preprocessor's _check_rejected_response): null,
    or the chosen answer itself. (An empty CSV cell is an empty text: its loader reads CSV with na_filter off.)"""
    value = row["rejected_response"]
    if value is None:
        return "is null"
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


def used_columns(row: Mapping[str, Any], needs: Needs, *, messages: bool,
                 alpaca: bool) -> tuple[list[tuple[str, str]], list[tuple[str, list[str]]]]:  # fmt: skip
    """The row's columns (names as `_lower_keys` leaves them) ms-swift's template encodes as text, each with its
    target (see TARGETS): the system column beside a conversation; a query/response row's query (not alpaca's,
    the join of instruction and input), response (not GRPO's or PPO's: only reward functions read it) and system;
    a rejected answer. And the targets two or more names claim with none named as the target itself: ms-swift
    renames none of them, and the row has no question or answer (review BP: the answer tokens all -100)."""
    used: list[tuple[str, str]] = []
    clashes: list[tuple[str, list[str]]] = []
    for target, names in TARGETS:
        if (messages and target != "system") or (target == "query" and alpaca):
            continue
        found = [k for k in row if isinstance(k, str) and k.lower() in names]
        key = found[0] if len(found) == 1 else target if target in row else None
        if target == "response" and alpaca and "output" in row:
            key = "output"  # (alpaca takes its answer from 'output' by name, beside a 'text' say: review BQ)
        if target == "response" and needs == "prompt":
            continue
        if key is None and len(found) > 1 and target != "system":
            clashes.append((target, found))
        elif key is not None:
            used.append((key, target))
    if needs != "prompt" and "rejected_response" in row:
        used.append(("rejected_response", "rejected"))
    return used, clashes


def _json_kind(value: Any, target: str) -> str:
    """What a JSON value is to the template: text (a response may be a list of answers, the first taken), none, or
    what it is instead (ms-swift fails the row: a number, true/false, an object, a list of messages)."""
    if value is None or isinstance(value, str):
        return "none" if value is None else "text"
    if isinstance(value, list) and target == "response" and value and isinstance(value[0], str):
        return "text"
    if isinstance(value, bool):
        return "a true/false"
    return {int: "a number", float: "a number", dict: "an object", list: "a list"}.get(type(value), "no text")


def _check_messages(value: Any, where: str, *, needs: Needs = None) -> None:
    if not isinstance(value, list) or not value:
        raise Invalid(f"{where} must be a non-empty list of messages")
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise Invalid(f'{where}[{i}] must be an object such as {{"role": "user", "content": "..."}}')
        if _is_pair(msg):  # ({"human": ..., "assistant": ...}: ms-swift's sharegpt pairs, a turn each)
            continue
        role_key, content_key = ("role", "content") if "role" in msg or "content" in msg else ("from", "value")
        calls = "tool_calls" in msg  # (OpenAI's: its content may be null or left out)
        if role_key not in msg or (content_key not in msg and not calls):
            raise Invalid(f"{where}[{i}] needs 'role' and 'content' (or 'from' and 'value')")
        role, content = msg[role_key], msg.get(content_key)
        if not isinstance(role, str) or role not in ROLES:
            raise Invalid(f"{where}[{i}]: {role_key} {str(role)[:40]!r} is not one ms-swift takes: use system, user, "
                          "assistant or tool (or human, gpt, function_call, observation)")  # fmt: skip
        if content is None and not calls:
            raise Invalid(f"{where}[{i}]: its {content_key} is null: ms-swift drops such a row; give text")
        # (a tool call's or result's object or number ms-swift turns into text itself: review AQ)
        # (GRPO's and PPO's answers only reward functions read; an rlhf upload's kind is not known yet)
        typed = needs != "either" and not (needs == "prompt" and role in ANSWER_ROLES)
        if typed and content is not None and not isinstance(content, str | list) and role in TEXT_ROLES:
            kind = "true/false" if isinstance(content, bool) else type(content).__name__
            raise Invalid(f"{where}[{i}]: its {content_key} is a {kind}: ms-swift takes text (or a list of content "
                          "blocks); quote it")  # fmt: skip


def _is_pair(msg: dict[str, Any]) -> bool:
    return not ({"role", "content", "from", "value"} & msg.keys()) and bool(
        {"user", "human"} & msg.keys() and ANSWER_ROLES & msg.keys()
    )


def _repaired(value: Any, where: str) -> Any:
    """A conversation given as text (a CSV cell, a JSON string) as ms-swift repairs it: read as JSON, else as a
    Python literal (its default_repair_messages)."""
    if not isinstance(value, str):
        return value
    if len(value) > MAX_MESSAGES_TEXT:
        raise Invalid(f"{where} is a text of more than 1 MiB: write the conversation as a JSON list")
    try:
        return json.loads(value)
    except ValueError:
        pass
    try:
        return ast.literal_eval(value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise Invalid(f"{where} is a text that is neither JSON nor a Python literal: ms-swift cannot read it as "
                      "a conversation") from None  # fmt: skip


def _lower_keys(row: dict[str, Any], where: str) -> dict[str, Any]:
    """The row's columns as ms-swift matches them: the query/response names without regard to case ("Query" is
    its query), the rest only as written ("Messages", "Label" are not its messages and label)."""
    if all(not isinstance(k, str) or k == k.lower() or k.lower() not in ANY_CASE_KEYS for k in row):
        return row
    out: dict[str, Any] = {}
    for k, v in row.items():
        name = k.lower() if isinstance(k, str) and k.lower() in ANY_CASE_KEYS else k
        if name in out:
            raise Invalid(f"{where}: columns '{name}' and '{k}' are one column to ms-swift (it matches names "
                          "without regard to case): keep one")  # fmt: skip
        out[name] = v
    return out


class CsvColumns:
    """Whether a CSV column that ms-swift's template encodes as text (`used_columns`) holds only numbers, or only
    true/false, in its first CSV_TYPED_ROWS rows (datasets' first batch): pandas then types the column so, and
    every row failed ('int' object is not iterable), or the next batch's text failed the load (hunt BK, reviews
    BO, BP). A column of both, or with any other text (an empty cell too: `na_filter` is off), is text. An alpaca
    instruction of numbers fails where its input is empty (the query is then the instruction alone)."""

    def __init__(self, needs: Needs) -> None:
        self.kinds: dict[str, set[str]] = {}
        self.needs = needs
        self.rows = 0
        self.empty_input = False

    def add(self, row: Any) -> None:
        if self.rows >= CSV_TYPED_ROWS or self.needs == "either" or not isinstance(row, dict):
            return
        self.rows += 1
        alpaca = "instruction" in row and "input" in row
        lowered = _lower_keys(row, "")
        messages = any(m in lowered for m in MESSAGE_KEYS)
        used, _ = used_columns(lowered, self.needs, messages=messages, alpaca=alpaca)
        keys = [k for k, _ in used if not messages or k == "rejected_response"]  # (a CSV of conversations with
        if alpaca and not messages:  # a system column of numbers trained: review BO's n12)
            keys.append("instruction")
            self.empty_input = self.empty_input or lowered["input"] == ""
        for k in keys:
            self.kinds.setdefault(k, set()).add(_csv_kind(lowered[k]))

    def check(self) -> None:
        for name, kinds in self.kinds.items():
            if name == "instruction" and not self.empty_input:
                continue
            if kinds in ({"numbers"}, {"true/false"}):
                raise Invalid(f"column '{name}' holds only {kinds.pop()} in its first {self.rows:,} rows: ms-swift "
                              "reads CSV with pandas, which then gives the column as non-text, and its rows fail; "
                              "write the file as .jsonl with the values as quoted text")  # fmt: skip


# What pandas' CSV reader takes for a number: spaces around it, and inf / infinity, too (review BP).
_CSV_NUMBER = re.compile(r"\s*[+-]?((\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|inf|infinity)\s*", re.IGNORECASE)


def _csv_kind(value: Any) -> str:
    if not isinstance(value, str):
        return "text"
    return "numbers" if _CSV_NUMBER.fullmatch(value) else "true/false" if value in _BOOL_WORDS else "text"
