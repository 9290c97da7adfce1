"""A data set as ms-swift would read it: formats, row counts, what each kind of training needs per row."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from application.exceptions import Invalid
from application.services.dataset_rows import data_needs
from application.services.datasets import FIRST_ROW_MAX, HEAD_BYTES, _array_length, check_dataset

MESSAGES = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def write(path: Path, rows: list[Any] | str) -> Path:
    path.write_text(rows if isinstance(rows, str) else "".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD: dict[str, list[Any]] = {
    "messages.jsonl": [MESSAGES] * 7,
    "sharegpt.jsonl": [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}] * 3,
    "qr.jsonl": [{"query": "q", "response": "r", "history": []}] * 4,
    "alpaca.jsonl": [{"instruction": "i", "input": "", "output": "o"}] * 5,
    "text.jsonl": [{"text": "pre-training text"}] * 2,
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_each_format_ms_swift_accepts_passes_with_its_row_count(tmp_path: Path, name: str) -> None:
    info = check_dataset("data_path", write(tmp_path / name, GOOD[name]))
    assert info.rows == len(GOOD[name]) and info.rows_exact


def test_json_arrays_and_csv_pass_with_their_row_counts(tmp_path: Path) -> None:
    array = tmp_path / "rows.json"
    array.write_text(json.dumps([MESSAGES] * 6))
    assert check_dataset("data_path", array).rows == 6
    csv_file = tmp_path / "rows.csv"
    csv_file.write_text('query,response\n"a, b",c\nd,e\nf,g\n')
    assert check_dataset("data_path", csv_file).rows == 3
    # Records, not lines: a quoted field with line breaks is one row (it counted 3, "exact").
    quoted = tmp_path / "quoted.csv"
    quoted.write_text('query,response\r\n"multi\nline",hello\r\n\r\nyo,there\r\n')
    info = check_dataset("data_path", quoted)
    assert (info.rows, info.rows_exact) == (2, True)
    big = write(tmp_path / "big.jsonl", [MESSAGES] * 30_000)  # past the rows that are parsed: counted, not parsed
    assert check_dataset("data_path", big).rows == 30_000


def test_csv_ms_swift_reads_passes_and_csv_it_refuses_is_refused_naming_the_line(tmp_path: Path) -> None:
    long = tmp_path / "long.csv"  # a document in one field: past the csv module's default 128 KiB limit
    long.write_text(f'query,response\nhi,"{"x" * 200_000}"\n')
    assert check_dataset("data_path", long).rows == 1
    old_mac = tmp_path / "cr.csv"  # lines ended by a bare CR
    old_mac.write_text("query,response\rhi,yo\rhow,fine\r", newline="")
    assert check_dataset("data_path", old_mac).rows == 2
    extra = tmp_path / "extra.csv"
    extra.write_text("query,response\nhi,hello,see image\n")
    with pytest.raises(Invalid) as exc:
        check_dataset("data_path", extra)
    assert "extra.csv" in exc.value.detail and "line 2 has more fields than the header" in exc.value.detail
    open_quote = tmp_path / "open.csv"  # pandas: "EOF inside string"
    open_quote.write_text('query,response\nhi,"yo\nhow,fine\n')
    with pytest.raises(Invalid) as exc:
        check_dataset("data_path", open_quote)
    assert "open.csv" in exc.value.detail and "quoted field is still open" in exc.value.detail
    inch = tmp_path / "inch.csv"  # a quote inside an unquoted field is text to pandas too
    inch.write_text('query,response\nsize?,5" screen\n')
    assert check_dataset("data_path", inch).rows == 1
    big_cr = tmp_path / "big_cr.csv"  # lines ended by a bare CR, past the head read whole
    big_cr.write_bytes(b"query,response\r" + b"what is it?," + b"x" * 200 + b"\r" * 1 + (b"hi,yo\r" * 1_500_000))
    info = check_dataset("data_path", big_cr)
    assert not info.rows_exact and info.rows is not None and 1_400_000 < info.rows < 1_600_000, info
    late = tmp_path / "late.csv"  # past the rows sampled: found by the count
    late.write_text("query,response\n" + "hi,yo\n" * 40 + "a,b,c\n")
    with pytest.raises(Invalid) as exc:
        check_dataset("data_path", late)
    assert "late.csv" in exc.value.detail and "line 42 has more fields" in exc.value.detail


@pytest.mark.parametrize("text", ["[]", " [ ] \n", '[1,"a]",{"b":[2,3]}]', '\n[\n {"x": "]"} ,\r\n\t[] ]\n', "[[[]]]"])
def test_a_json_array_is_counted_a_row_at_a_time_as_its_whole_decode_would(text: str) -> None:
    # One row at a time: the whole array decoded at once held the GIL (and the event loop) for seconds.
    assert _array_length(text) == len(json.loads(text))


@pytest.mark.parametrize("text", ["", "{}", "[1,", "[1 2]", "[1,]", "[1] 2", "[1]]", '["a]'])
def test_what_is_not_one_json_array_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        _array_length(text)


def test_blank_lines_are_not_rows_and_a_row_across_the_counters_blocks_counts_once(tmp_path: Path) -> None:
    row = json.dumps(MESSAGES)
    spaced = tmp_path / "spaced.jsonl"
    spaced.write_text(f"{row}\n\n  \n\r\n{row}\n\n")
    info = check_dataset("data_path", spaced)
    assert (info.rows, info.rows_exact) == (2, True)
    # The counter reads 1 MiB at a time: a row whose text ends just before a block's end and whose newline
    # starts the next; then one cut inside its text; then one that ends the file without a newline.
    block = 1 << 20
    first = json.dumps({**MESSAGES, "pad": "x" * (block - len(row) - 12)})
    first = first[:-1] + " " * (block - len(first)) + "}"  # exactly one block, its newline in the next
    assert len(first) == block
    across = tmp_path / "across.jsonl"
    across.write_text(f"{first}\n \n{row}\n" + json.dumps({**MESSAGES, "pad": "y" * block}) + f"\n\n{row}")
    assert check_dataset("data_path", across).rows == 4


BROKEN: dict[str, tuple[list[Any] | str, list[str]]] = {
    "badline.jsonl": (json.dumps(MESSAGES) + "\n" * 2 + '{"messages": [}\n',
                      ["badline.jsonl", "line 3", "not valid JSON"]),
    "columns.jsonl": ([{"foo": 1, "bar": 2}], ["line 1", "no columns", "found: bar, foo", "messages"]),
    "notlist.jsonl": ([{"messages": "hello"}], ["line 1", "is a text that is neither JSON nor"]),
    "norole.jsonl": ([MESSAGES, {"messages": [{"content": "x"}]}], ["line 2", "'messages'[0]", "'role'"]),
    "scalar.jsonl": (["just a string"], ["line 1", "JSON object"]),
    "empty.jsonl": ("", ["is empty"]),
    "blank.jsonl": ("\n\n  \n", ["is empty"]),
    "rows.txt": ("hello\n", [".jsonl, .json or .csv"]),
    "header.csv": ("foo,bar\n1,2\n", ["line 2", "no columns"]),
    "array.json": ('[{"messages": []}]', ["element 1", "non-empty list"]),
    # Python's JSON decoder recurses per level: these were a 500 (RecursionError), on create and on upload.
    "deep.jsonl": ('{"messages":' + "[" * 100_000 + "]" * 100_000 + "}\n", ["line 1", "nested too deeply"]),
    "deep.json": ('[{"messages":' + "[" * 100_000 + "]" * 100_000 + "}]", ["element 1", "nested too deeply"]),
    "deeper.json": ("[" * 100_000 + "]" * 100_000, ["nested too deeply"]),
    # What ms-swift's reader (datasets' JSON) refuses after the job's wait, and Python's took (hunt AO).
    "surrogate.jsonl": ('{"messages": [{"role": "user", "content": "a\\ud800b"}]}\n', ["line 1", "no pair"]),
    "surrogate.json": ('[{"messages": [{"role": "user", "content": "\\udc00"}]}]', ["element 1", "no pair"]),
    # Python's own message named its setting (sys.set_int_max_str_digits), not what to change in the file.
    "digits.jsonl": ('{"messages": [], "n": 1' + "0" * 5000 + "}\n", ["line 1", "more than 4300 digits"]),
    "digits.json": ('[{"n": 1' + "0" * 5000 + "}]", ["element 1", "more than 4300 digits"]),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_broken_data_set_names_the_file_the_row_and_the_problem(tmp_path: Path, name: str) -> None:
    content, words = BROKEN[name]
    with pytest.raises(Invalid) as exc:
        check_dataset("data_path", write(tmp_path / name, content))
    for word in words:
        assert word in exc.value.detail, (word, exc.value.detail)
    assert "set_int_max_str_digits" not in exc.value.detail


def test_content_ms_swift_takes_passes_blocks_objects_numbers_nan_and_paired_escapes(tmp_path: Path) -> None:
    # datasets loads mixed types as JSON, and ms-swift turns a tool call's object content into text itself: such
    # agent data was refused for a while (review AQ).
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                          {"role": "tool_call", "content": {"name": "f", "arguments": {"x": 1}}},
                          {"role": "tool", "content": 5}, {"role": "assistant", "content": "done"}]},
            {"messages": [{"role": "user", "content": "\U0001F600 \u00e9"}], "score": float("nan")}]  # fmt: skip
    assert check_dataset("data_path", write(tmp_path / "ok.jsonl", rows)).rows == 2  # (json.dumps escapes the pair)


def test_preference_data_needs_a_rejected_answer(tmp_path: Path) -> None:
    plain = write(tmp_path / "plain.jsonl", [MESSAGES])
    with pytest.raises(Invalid) as exc:
        check_dataset("data_path", plain, needs="rejected")
    assert "rejected_response" in exc.value.detail
    pref = write(tmp_path / "pref.jsonl", [{**MESSAGES, "rejected_response": "no"}])
    assert check_dataset("data_path", pref, needs="rejected").rows == 1


@pytest.mark.parametrize(
    ("row", "why"),
    [
        ({**MESSAGES, "rejected_response": None}, "is null"),
        ({**MESSAGES, "rejected_response": "hello"}, "is the chosen answer itself"),
        ({"query": "hi", "response": "hello", "rejected_response": "hello"}, "is the chosen answer itself"),
    ],
)
def test_a_rejected_answer_swift_would_drop_is_refused_naming_its_row(tmp_path: Path, row: dict[str, Any],
                                                                        why: str) -> None:  # fmt: skip
    # ms-swift drops a row whose rejected_response is null or the chosen answer ("the data will be deleted"): a
    # file of them passed the check and the run failed on a bare ZeroDivisionError (hunt AJ, the real swift).
    good = {**MESSAGES, "rejected_response": "no"}
    pref = write(tmp_path / "pref.jsonl", [good, good, row])
    with pytest.raises(Invalid) as exc:
        check_dataset("data_path", pref, needs="rejected")
    assert "line 3" in exc.value.detail and f"'rejected_response' {why}: ms-swift drops such a row" in exc.value.detail


@pytest.mark.parametrize(
    ("row", "says"),
    [
        ({"messages": [{"role": "user", "content": "hi"}], "rejected_response": "no"}, "end it with the assistant's"),
        ({"conversations": [{"from": "human", "value": "hi"}], "rejected_response": "no"}, "end it with the"),
        (
            {
                "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}],
                "rejected_response": "no",
            },
            "and that turn is empty: give the answer's text",
        ),
        (
            {
                "messages": [{"role": "user", "content": "hi"}],
                "rejected_messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}],
            },
            "end it with the assistant's turn",
        ),
    ],
)
def test_a_preference_row_with_no_chosen_answer_is_refused(tmp_path: Path, row: dict[str, Any], says: str) -> None:
    # The same rows as {"query", "rejected_response"} were refused, but as a conversation ending with the user's turn
    # DPO and RM trained to the end on no chosen answer (logps/chosen 0, rewards 0) and completed (hunt DH).
    good = {**MESSAGES, "rejected_response": "no"}
    pref = write(tmp_path / "pref.jsonl", [good, row])
    with pytest.raises(Invalid) as exc:
        check_dataset("data_path", pref, needs="rejected")
    assert "line 2" in exc.value.detail and "takes a conversation's last turn as the chosen answer" in exc.value.detail
    assert says in exc.value.detail, exc.value.detail


def test_a_chosen_rejected_file_is_told_how_to_name_its_columns(tmp_path: Path) -> None:
    # "no columns ms-swift can train on (found: chosen, prompt, rejected)" said nothing of the rename that works
    # (hunt DH, the real swift).
    pairs = write(tmp_path / "pairs.jsonl", [{"prompt": "hi", "chosen": "hello", "rejected": "go away"}])
    with pytest.raises(Invalid) as exc:
        check_dataset("data_path", pairs, needs="rejected")
    assert 'training.columns {"chosen": "response", "rejected": "rejected_response"}' in exc.value.detail
    renames = {"chosen": "response", "rejected": "rejected_response"}
    assert check_dataset("data_path", pairs, needs="rejected", columns=renames).rows == 1
    # trl's form, conversations: the rename that works for them (the texts' was refused next: review DL).
    chats = write(tmp_path / "chats.jsonl", [{"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant",
                  "content": "hello"}], "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant",
                  "content": "go away"}]}])  # fmt: skip
    with pytest.raises(Invalid) as exc:
        check_dataset("data_path", chats, needs="rejected")
    assert 'training.columns {"chosen": "messages", "rejected": "rejected_messages"}' in exc.value.detail
    renames = {"chosen": "messages", "rejected": "rejected_messages"}
    assert check_dataset("data_path", chats, needs="rejected", columns=renames).rows == 1


def test_an_empty_rejected_cell_of_a_csv_file_is_an_empty_answer(tmp_path: Path) -> None:
    # ms-swift's loader reads CSV with na_filter off: an empty cell is "", not null, and `swift rlhf --rlhf_type
    # dpo` trains on it (hunt BK, with the real CLI). It was refused as a row swift drops.
    pref = tmp_path / "pref.csv"
    pref.write_text("query,response,rejected_response\nhi,hello,go away\nhi,hello,\n")
    assert check_dataset("data_path", pref, needs="rejected").rows == 2


# Each failed `swift sft` / `swift rlhf` with the real ms-swift 4.6 after its wait, or trained (hunt BK).
REFUSED_ROWS = [
    ("num.csv", "query,response\nWhat is 2+2?,4\nWhat is 3+3?,6\n", None, "only numbers in its first 2 rows"),
    ("bool.csv", "query,response\nok?,true\nno?,false\n", None, "holds only true/false in its first 2 rows"),
    ("num.jsonl", [{"query": "2+2?", "response": 4}], None, "its 'response' is a number: ms-swift takes text"),
    ("sys.jsonl", [{"query": 7, "response": "x"}], None, "its 'query' is a number"),
    ("dev.jsonl", [{"messages": [{"role": "developer", "content": "be brief"}, *MESSAGES["messages"]]}], None,
     "role 'developer' is not one ms-swift takes"),
    ("model.jsonl", [{"conversations": [{"from": "human", "value": "hi"}, {"from": "model", "value": "yo"}]}],
     None, "from 'model' is not one ms-swift takes"),
    ("null.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]}],
     None, "its content is null"),
    ("int.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 4}]}], None,
     "its content is a int"),
    ("kto.jsonl", [{"messages": [*MESSAGES["messages"], {"role": "user", "content": "more?"}], "label": False}],
     "label", "end it with the assistant's turn"),
    ("kto.csv", "query,response,label\nq1,answer one, true\n", "label", "KTO needs a 'label' per row"),
    ("dup.jsonl", [{"query": "hi", "Query": "hey", "response": "x"}], None, "columns 'query' and 'Query' are one"),
    ("twice.jsonl", '{"query": "hi", "response": "yo", "response": "b"}\n', None,
     "the key 'response' appears twice in one object"),
    # Review BN: every column ms-swift maps to the answer is encoded; the messages column, label and
    # rejected_response are matched only as written.
    ("gsm.csv", "question,answer\nWhat is 1+1?,2\n", None, "'answer' holds only numbers"),
    ("answer.jsonl", [{"problem": "1+1?", "answer": 2}], None, "its 'answer' is a number"),
    ("Messages.jsonl", [{"Messages": MESSAGES["messages"]}], None, "no columns ms-swift can train on"),
    ("Label.jsonl", [{**MESSAGES, "Label": True}], "label", "KTO needs a 'label' per row"),
    ("Rejected.jsonl", [{**MESSAGES, "Rejected_Response": "no"}], "rejected", "needs a rejected answer"),
    # Review BO: a GRPO prompt is encoded (only its answers are not); a system column beside a conversation is;
    # a rejected answer is; an instruction with no input is the query; rows of two formats lose one.
    ("grpo_q.jsonl", [{"query": 5}], "prompt", "its 'query' is a number"),
    ("SYSTEM.jsonl", [{"SYSTEM": 5, **MESSAGES}], None, "its 'system' is a number"),
    ("rej.jsonl", [{**MESSAGES, "rejected_response": 100}], "rejected", "its 'rejected_response' is a number"),
    ("inst.jsonl", [{"instruction": 1, "output": "yes"}], None, "its 'instruction' is a number"),
    ("alpaca_num.jsonl", [{"instruction": 1, "input": "", "output": "yes"}], None,
     "'instruction' and 'input' give no text query"),
    ("mixed.jsonl", [MESSAGES, {"query": "hi", "response": "yo"}], None, "its rows mix conversations with"),
    # Review BP: a JSON number among text answers is a row swift drops; TRL's conversational prompt/completion
    # (lists of messages) fails; two answer names with no 'response' leave no answer (labels all -100), two
    # question names no question (mixed-case alpaca: swift chooses alpaca by the names as written); pandas
    # reads " 42" as a number; an alpaca instruction of numbers with no input is the query alone.
    ("some.jsonl", [{"query": "hi", "response": "yo"}, {"query": "0+1?", "response": 1}], None,
     "line 2: its 'response' is a number"),
    ("trl.jsonl", [{"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant",
                    "content": "yo"}]}], None, "a conversation goes in a 'messages' column"),
    ("tweets.csv", "id,keyword,location,text,target\n1,,,Our Deeds are the Reason,1\n", None,
     "columns 'text', 'target' all name the answer"),
    ("Alpaca.csv", "Instruction,Input,Output\nSay hi,,hello\n", None, "'instruction', 'input' all name the question"),
    ("spaced.csv", "query,response\nhi, 42\nyo,7 \n", None, "'response' holds only numbers"),
    ("alpaca_num.csv", "instruction,input,output\n5,,yes\n6,,no\n", None, "'instruction' holds only numbers"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "content", "needs", "says"), REFUSED_ROWS, ids=[r[0] + r[3][:20] for r in REFUSED_ROWS]
)
def test_rows_ms_swift_fails_on_are_refused(tmp_path: Path, name: str, content: Any, needs: Any, says: str) -> None:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    else:
        write(path, content)
    with pytest.raises(Invalid) as exc:
        check_dataset("data_path", path, needs=needs)
    assert says in exc.value.detail, exc.value.detail


def test_rows_ms_swift_trains_on_are_taken(tmp_path: Path) -> None:
    chat = json.dumps(MESSAGES["messages"])
    taken = {
        # Column names without regard to case, as swift matches them.
        "upper.csv": "Query,Response\nhi,yo\n",
        # A conversation as text: swift reads it as JSON (or a Python literal).
        "text.jsonl": json.dumps({"messages": chat}) + "\n",
        "text.csv": "messages\n" + '"' + chat.replace('"', '""') + '"\n',
        # OpenAI's tool calls may leave content out.
        "calls.jsonl": json.dumps({"messages": [{"role": "user", "content": "weather?"}, {"role": "assistant",
                                   "tool_calls": [{"type": "function", "function": {"name": "w", "arguments": "{}"}}]},
                                   {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]})
        + "\n",
        # A column of numbers beside text is text to pandas.
        "mixed.csv": "query,response\nWhat is 2+2?,4\nSay hi,hi\n",
    }  # fmt: skip
    for name, content in taken.items():
        (tmp_path / name).write_text(content)
        assert check_dataset("data_path", tmp_path / name).rows == 1 + (name == "mixed.csv"), name
    # KTO sums its labels: 1.0 and 0.0 sum as 1 and 0 do.
    kto = write(tmp_path / "kto.jsonl", [{**MESSAGES, "label": 1.0}, {**MESSAGES, "label": 0.0}])
    assert check_dataset("data_path", kto, needs="label").rows == 2
    (tmp_path / "kto.csv").write_text("query,response,label\nq1,a1,1.00\nq2,a2,0.00\n")
    assert check_dataset("data_path", tmp_path / "kto.csv", needs="label").rows == 2


TAKEN_ROWS = [
    # Each trained with the real ms-swift 4.6 (review BN): alpaca joins a numeric input as text; a CSV column
    # with text past its first rows is text to pandas; GRPO's answers only reward functions read; an array's
    # repeated key keeps its last value; a column swift does not map may share a name with another in case;
    # ms-swift's own paired turns.
    ("alpaca.jsonl", [{"instruction": "Square this number", "input": 2, "output": "4"}] * 2, None, 2),
    ("alpaca.csv", "instruction,input,output\nSquare this number,2,It is 4\n", None, 1),
    ("late.csv", "query,response\n" + "".join(f"What is {n}+0?,{n}\n" for n in range(25)) + "What is 1/7?,1/7\n",
     None, 26),
    ("grpo.csv", "query,response\nWhat is 1+1?,2\n", "prompt", 1),
    ("grpo.jsonl", [{"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": 2}],
                    "solution": 2}], "prompt", 1),
    ("array.json", '[{"query": "hi", "response": "old", "response": "hello"}]', None, 1),
    ("id.jsonl", [{"id": 0, "ID": "row-0", "query": "hi", "response": "yo"}], None, 1),
    ("pairs.jsonl", [{"system": "be kind", "conversation": [{"human": "hi", "assistant": "hello"}]}], None, 1),
    # Review BO: of two answer columns ms-swift renames neither and uses 'response'.
    ("two.jsonl", [{"question": "What is 0+2?", "response": "It is 2.", "answer": 2}], None, 1),
    ("Two.jsonl", [{"Question": "What is 0+2?", "Response": "It is 2.", "Answer": 2}], None, 1),
    ("answers.jsonl", [{"query": "hi", "response": ["yo", "hello"]}], None, 1),  # (a list of answers: the first)
    # Review BQ: tatsu-lab/alpaca's shape: alpaca takes 'output' by name, whatever other answer names are there.
    ("tatsu.jsonl", [{"instruction": "Translate the sentence into French.", "input": "I love cats.",
                      "output": "J'aime les chats.", "text": "Below is an instruction ... J'aime les chats."},
                     {"instruction": "Say hi.", "input": "", "output": "Hi!", "text": "Below ... Hi!"}], None, 2),
    ("tatsu.csv", "instruction,input,output,text\nSay hi.,,Hi!,Below ... Hi!\n", None, 1),
    ("answer_too.jsonl", [{"instruction": "1+1?", "input": "", "output": "It is 2.", "answer": "2"}], None, 1),
    ("onetrue.csv", "query,response\nhi,1\nyo,true\n", None, 2),  # (numbers and true/false: pandas keeps text)
]  # fmt: skip


@pytest.mark.parametrize(("name", "content", "needs", "rows"), TAKEN_ROWS, ids=[r[0] for r in TAKEN_ROWS])
def test_rows_ms_swift_trains_on_in_these_shapes_are_taken(
    tmp_path: Path, name: str, content: Any, needs: Any, rows: int
) -> None:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    else:
        write(path, content)
    assert check_dataset("data_path", path, needs=needs).rows == rows


def test_a_suffix_not_in_lower_case_is_refused_with_the_name_to_give(tmp_path: Path) -> None:
    # swift maps 'jsonl' to the json reader, not 'JSONL': it looked for a hub data set named JSONL (hunt BK).
    path = write(tmp_path / "data.JSONL", [MESSAGES])
    with pytest.raises(Invalid, match=r"rename it to 'data\.jsonl'"):
        check_dataset("data_path", path)


def test_kto_data_needs_a_label_and_an_rlhf_upload_either_kind(tmp_path: Path) -> None:
    plain = write(tmp_path / "plain.jsonl", [MESSAGES])
    labelled = write(tmp_path / "kto.jsonl", [{**MESSAGES, "label": True}, {**MESSAGES, "label": False}])
    pref = write(tmp_path / "pref.jsonl", [{**MESSAGES, "rejected_response": "no"}])
    text = tmp_path / "kto.csv"
    text.write_text("query,response,label\nhi,hello,true\nhi,go away,false\n")
    with pytest.raises(Invalid, match="KTO needs a 'label' per row"):
        check_dataset("data_path", plain, needs="label")  # (swift failed on it, after the job's wait)
    assert check_dataset("data_path", labelled, needs="label").rows == 2
    assert check_dataset("data_path", text, needs="label").rows == 2
    # ms-swift sums the labels: text in a JSON row, or a CSV column mixing true with 1, fails there.
    words = write(tmp_path / "words.jsonl", [{**MESSAGES, "label": "true"}])
    with pytest.raises(Invalid, match="KTO needs a 'label' per row"):
        check_dataset("data_path", words, needs="label")
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("query,response,label\nhi,hello,true\nhi,go away,0\n")
    with pytest.raises(Invalid, match="mixes true/false with 1/0"):
        check_dataset("data_path", mixed, needs="label")
    # An upload for rlhf: a preference set or a KTO one (a KTO file was refused for its missing rejected answers).
    assert check_dataset("file", labelled, needs="either").rows == 2
    assert check_dataset("file", pref, needs="either").rows == 1
    with pytest.raises(Invalid, match="a 'label' true/false for KTO, or a prompt alone"):
        check_dataset("file", plain, needs="either")


def test_grpo_and_ppo_take_prompts_alone_and_other_kinds_still_need_answers(tmp_path: Path) -> None:
    prompts = write(tmp_path / "prompts.jsonl", [{"prompt": "What is 2+2?"}, {"problem": "Solve x+1=2"}])
    for rlhf_type in ("grpo", "ppo"):
        assert check_dataset("data_path", prompts, needs=data_needs("rlhf", rlhf_type)).rows == 2
    # An upload for rlhf (its type not known yet): GRPO's usual forms too, a prompt with a solution, or a
    # conversation ending with the user's turn.
    grpo = write(tmp_path / "grpo.jsonl", [{"problem": "1+1?", "solution": "2"}, {"problem": "2+2?", "solution": "4"}])
    chats = write(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": "1+1?"}]}] * 2)
    for data in (prompts, grpo, chats):
        assert check_dataset("file", data, needs="either").rows == 2
    # Both forms in one file: ms-swift reads it as conversations and drops the others (review BO).
    mixed = write(tmp_path / "mixed.jsonl", [{"problem": "1+1?", "solution": "2"},
                                             {"messages": [{"role": "user", "content": "1+1?"}]}])  # fmt: skip
    with pytest.raises(Invalid, match="its rows mix conversations with"):
        check_dataset("file", mixed, needs="either")
    kinds: list[tuple[str, str | None]] = [("sft", None), ("rlhf", "dpo"), ("rlhf", "gkd")]
    for kind, other in kinds:
        with pytest.raises(Invalid, match="no columns ms-swift can train on"):
            check_dataset("data_path", prompts, needs=data_needs(kind, other))


def test_unreadable_and_folder_data_sets(tmp_path: Path) -> None:
    folder = tmp_path / "dir.jsonl"
    folder.mkdir()
    with pytest.raises(Invalid, match="not a file"):
        check_dataset("data_path", folder)


def test_text_that_is_not_utf8_is_refused_as_ms_swift_would_refuse_it(tmp_path: Path) -> None:
    # ms-swift's readers take UTF-8 only; json.loads guessed UTF-16 from the bytes, so such a file passed and its
    # job failed after its wait.
    line = json.dumps(MESSAGES) + "\n"
    cases = {
        "utf16.jsonl": ((line * 2).encode("utf-16"), "the file is UTF-16 text: save it as UTF-8"),
        "utf16le.jsonl": ((line * 2).encode("utf-16-le"), "line 1 holds a NUL byte"),
        "latin1.csv": ("query,response\nq,caf\u00e9\n".encode("latin-1"), "line 2 is not UTF-8 text (byte 0xe9)"),
        "latin1.json": (('[{"query": "q", "response": "caf\u00e9"}]').encode("latin-1"), "not UTF-8 text"),
    }
    for name, (content, says) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(Invalid, match=re.escape(says)):
            check_dataset("data_path", tmp_path / name)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + line.encode() * 2)
    assert check_dataset("data_path", tmp_path / "bom.jsonl").rows == 2
    # The 8 MiB read may cut a character in two: that is no reason to refuse.
    first = json.dumps({**MESSAGES, "pad": "x" * (HEAD_BYTES - 1000)}) + "\n"
    prefix = '{"messages": [{"role": "user", "content": "'
    if (HEAD_BYTES - 1 - len(first) - len(prefix)) % 2:
        first = " " + first  # (the read's last byte is then the first of a two-byte character)
    second = prefix + "\u00e9" * 1000 + '"}, {"role": "assistant", "content": "x"}]}\n'
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes((first + second + second).encode())
    assert cut.read_bytes()[HEAD_BYTES - 1 : HEAD_BYTES + 1] == "\u00e9".encode()
    assert check_dataset("data_path", cut).rows == 3


def test_a_first_row_longer_than_the_head_is_read_whole(tmp_path: Path) -> None:
    # A row with inline media past 8 MiB was refused as "no rows found in its first 8 MiB"; ms-swift reads it.
    turns = [{"role": "user", "content": "x" * (HEAD_BYTES + 1000)}, {"role": "assistant", "content": "ok"}]
    long = {"messages": turns}
    assert check_dataset("data_path", write(tmp_path / "long.jsonl", [long, MESSAGES])).rows == 2
    # ... also after a CSV's header, or a blank first line (it waited only for a first newline of any kind).
    wide = "x" * (HEAD_BYTES + 1000)
    (tmp_path / "long.csv").write_text(f"query,response\nq,{wide}\nq,r\n")
    assert check_dataset("data_path", tmp_path / "long.csv").rows == 2
    (tmp_path / "blank.jsonl").write_text("\n" + json.dumps(long) + "\n" + json.dumps(MESSAGES) + "\n")
    assert check_dataset("data_path", tmp_path / "blank.jsonl").rows == 2
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps([long, MESSAGES], indent=2))
    assert check_dataset("data_path", pretty).rows == 2
    endless = tmp_path / "endless.jsonl"
    endless.write_bytes(b'{"messages": "' + b"x" * FIRST_ROW_MAX)
    with pytest.raises(Invalid, match="its first row is longer than 64 MiB, more than the server checks"):
        check_dataset("data_path", endless)


@pytest.mark.parametrize("first", ["conversations", "query/response"])
def test_a_row_of_the_other_kind_past_the_sampled_rows_is_found(tmp_path: Path, first: str) -> None:
    # Two files joined with cat: ms-swift took the file's columns from all its rows, read it as conversations and
    # dropped every other row, in either order (review BP); only the first 20 rows were looked at.
    chat, pair = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, \
        {"query": "hi", "response": "yo"}  # fmt: skip
    rows = [chat] * 30 + [pair] * 5 if first == "conversations" else [pair] * 30 + [chat] * 5
    (tmp_path / "joined.json").write_text(json.dumps(rows))
    for data in (write(tmp_path / "joined.jsonl", rows), tmp_path / "joined.json"):
        with pytest.raises(Invalid, match=r"(line|element) 31 is (not )?a conversation, where the rows before it"):
            check_dataset("data_path", data)
    assert check_dataset("data_path", write(tmp_path / "one.jsonl", [pair] * 35)).rows == 35
    # The word as a value, or a key deeper down, is no conversation; nor, among conversations, does it make one.
    named = [pair] * 30 + [{"query": "messages", "response": "yo", "meta": {"messages": 1}}]
    assert check_dataset("data_path", write(tmp_path / "named.jsonl", named)).rows == 31
    told = [chat] * 30 + [{"query": 'what are "messages"?', "response": "messages"}]
    with pytest.raises(Invalid, match="line 31 is not a conversation"):
        check_dataset("data_path", write(tmp_path / "told.jsonl", told))
    # A column renamed to a conversation's name is one, in any case (as ms-swift renames).
    renamed_rows = [pair] * 30 + [{"Dialog": chat["messages"]}]
    with pytest.raises(Invalid, match="line 31 is a conversation"):
        check_dataset("data_path", write(tmp_path / "renamed.jsonl", renamed_rows), columns={"dialog": "messages"})


def test_a_jsonl_file_holding_one_json_array_is_read_as_datasets_reads_it(tmp_path: Path) -> None:
    # datasets reads a .jsonl whose lines are no JSON lines as one JSON document, and ms-swift trained on it; it
    # was refused as "line 1 is not valid JSON" (hunt BK).
    pretty = tmp_path / "pretty.jsonl"
    pretty.write_text(json.dumps([MESSAGES] * 3, indent=2))
    assert check_dataset("data_path", pretty).rows == 3
    lines_of_arrays = tmp_path / "arrays.jsonl"
    lines_of_arrays.write_text(json.dumps([MESSAGES]) + "\n" + json.dumps([MESSAGES]) + "\n")
    with pytest.raises(Invalid, match="is not a valid JSON array"):
        check_dataset("data_path", lines_of_arrays)


@pytest.mark.parametrize(("rows", "text"), [(1000, "hi"), (300_000, "hi"), (40, "x" * 600_000)])
def test_a_file_cut_short_past_the_rows_sampled_is_refused(tmp_path: Path, rows: int, text: str) -> None:
    # Only its first rows were decoded: a file whose copy was interrupted passed, and the job failed in ms-swift's
    # reader after its wait (hunt DD). Within the head read and past it, and rows so long that fewer than the
    # sample fit in the head (review DE).
    row = json.dumps({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "hello"}]})
    whole = tmp_path / "whole.jsonl"
    whole.write_text((row + "\n") * rows + "\n\n")
    assert check_dataset("data_path", whole).rows == rows
    cut = tmp_path / "cut.jsonl"
    cut.write_text((row + "\n") * rows + row[:40])
    with pytest.raises(Invalid) as caught:
        check_dataset("data_path", cut)
    assert "its last line is not valid JSON" in caught.value.detail and "copy it again" in caught.value.detail
