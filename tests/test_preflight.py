"""Pre-flight checks: a data set or model ms-swift could not use is refused at create, naming what is wrong."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from application.exceptions import Invalid
from application.services.preflight import _array_length, check_dataset, check_model, check_request, runs_inline
from application.services.swift_info import SwiftInfo
from tests.conftest import ROOT, make_model, settings_for

PROBE = ROOT / "tests" / "fixtures" / "swift" / "probe-4.6.0.json"
MESSAGES = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.fixture(scope="module")
def swift_4_6() -> SwiftInfo:
    return SwiftInfo.from_json(json.loads(PROBE.read_text()))


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
    big = write(tmp_path / "big.jsonl", [MESSAGES] * 30_000)  # past the rows that are parsed: counted, not parsed
    assert check_dataset("data_path", big).rows == 30_000


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
    "notlist.jsonl": ([{"messages": "hello"}], ["line 1", "'messages' must be a non-empty list"]),
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
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_broken_data_set_names_the_file_the_row_and_the_problem(tmp_path: Path, name: str) -> None:
    content, words = BROKEN[name]
    with pytest.raises(Invalid) as exc:
        check_dataset("data_path", write(tmp_path / name, content))
    for word in words:
        assert word in exc.value.detail, (word, exc.value.detail)


def test_preference_data_needs_a_rejected_answer(tmp_path: Path) -> None:
    plain = write(tmp_path / "plain.jsonl", [MESSAGES])
    with pytest.raises(Invalid) as exc:
        check_dataset("data_path", plain, needs="rejected")
    assert "rejected_response" in exc.value.detail
    pref = write(tmp_path / "pref.jsonl", [{**MESSAGES, "rejected_response": "no"}])
    assert check_dataset("data_path", pref, needs="rejected").rows == 1


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
    with pytest.raises(Invalid, match="or a 'label' true/false for KTO"):
        check_dataset("file", plain, needs="either")


def test_unreadable_and_folder_data_sets(tmp_path: Path) -> None:
    folder = tmp_path / "dir.jsonl"
    folder.mkdir()
    with pytest.raises(Invalid, match="not a file"):
        check_dataset("data_path", folder)


def test_a_model_folder_needs_config_and_tokenizer(tmp_path: Path, swift_4_6: SwiftInfo) -> None:
    folder = tmp_path / "Qwen2.5-0.5B-Instruct"
    folder.mkdir()
    with pytest.raises(Invalid, match=r"no config\.json"):
        check_model("model_path", folder, None, None, swift_4_6)
    (folder / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"]}')
    with pytest.raises(Invalid, match="no tokenizer"):
        check_model("model_path", folder, None, None, swift_4_6)
    (folder / "tokenizer_config.json").write_text("{}")
    check_model("model_path", folder, None, None, swift_4_6)  # a name ms-swift knows: type and template found
    with pytest.raises(Invalid, match="not a folder"):
        check_model("model_path", folder / "config.json", None, None, swift_4_6)


def test_ms_swift_must_be_able_to_tell_the_type_and_template(tmp_path: Path, swift_4_6: SwiftInfo) -> None:
    # The real ms-swift 4.6.0 fails on exactly these (fixtures fail_no_model_type / fail_no_template).
    tiny = make_model(tmp_path / "tiny-qwen2")
    with pytest.raises(Invalid) as exc:
        check_model("model_path", tiny, None, None, swift_4_6)
    assert "training.model_type (one of qwen2, qwen2_gte)" in exc.value.detail
    with pytest.raises(Invalid) as exc:
        check_model("model_path", tiny, "qwen2", None, swift_4_6)
    assert "training.template" in exc.value.detail and "qwen2_5" in exc.value.detail
    check_model("model_path", tiny, "qwen2", "qwen2_5", swift_4_6)
    with pytest.raises(Invalid, match="did you mean qwen2"):
        check_model("model_path", tiny, "qwen-2", "qwen2_5", swift_4_6)
    with pytest.raises(Invalid, match="not a template"):
        check_model("model_path", tiny, "qwen2", "no-such-template", swift_4_6)
    # A model this server trained and merged carries its args.json: ms-swift reads the type from it.
    merged = make_model(tmp_path / "checkpoint-20-merged")
    (merged / "args.json").write_text(json.dumps({"model_type": "qwen2", "template": "qwen2_5"}))
    check_model("model_path", merged, None, None, swift_4_6)
    # Without knowing the installed ms-swift, only the folder itself is checked.
    check_model("model_path", tiny, None, None, None)


async def test_create_refuses_a_broken_data_set_and_stores_its_row_count(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    model = make_model(tmp_path / "models" / "tiny-qwen2")
    bad = write(tmp_path / "bad.jsonl", [MESSAGES, {"prompt_only": 1}])
    good = write(tmp_path / "good.jsonl", [MESSAGES] * 12)
    async with app_factory() as client:
        r = await client.post("/jobs", json={"data_path": str(bad), "model_path": str(model), "output_dir": "b"})
        assert r.status_code == 422 and "bad.jsonl" in r.json()["detail"] and "line 2" in r.json()["detail"]
        r = await client.post("/jobs", json={"data_path": str(good), "model_path": str(model), "output_dir": "g"})
        assert r.status_code == 201, r.text
        assert (await client.get("/jobs/g")).json()["dataset_rows"] == 12
        r = await client.post("/jobs", json={"data_path": "AI-ModelScope/alpaca-gpt4-data-en#500",
                                             "model_path": str(model), "output_dir": "hub"})  # fmt: skip
        assert r.status_code == 201 and (await client.get("/jobs/hub")).json()["dataset_rows"] is None


def test_only_a_hub_only_request_on_a_local_disk_is_checked_without_a_thread() -> None:
    hub = ("AI-ModelScope/alpaca-gpt4-data-en#500", "Qwen/Qwen2.5-0.5B-Instruct")
    assert runs_inline(*hub, {"val_dataset": ["swift/self-cognition"]}, output_on_local_disk=True)
    assert not runs_inline(*hub, {}, output_on_local_disk=False)
    assert not runs_inline("./train.jsonl", hub[1], {}, output_on_local_disk=True)
    assert not runs_inline(hub[0], hub[1], {"val_dataset": ["swift/x", "team/val.jsonl"]}, output_on_local_disk=True)
    assert not runs_inline(hub[0], "~/models/qwen", {}, output_on_local_disk=True)


def test_the_inline_check_still_refuses_an_output_dir_that_a_symlink_takes_out_of_output_root(tmp_path: Path) -> None:
    settings = settings_for("redis://127.0.0.1:1/0", tmp_path)
    settings.OUTPUT_ROOT.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (settings.OUTPUT_ROOT / "escape").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    hub = ("AI-ModelScope/alpaca-gpt4-data-en", "Qwen/Qwen2.5-0.5B-Instruct")
    assert runs_inline(*hub, {}, output_on_local_disk=True)
    with pytest.raises(Invalid, match="outside OUTPUT_ROOT"):
        check_request(*hub, "escape/run", model_type=None, template=None, settings=settings, info=None)
    assert check_request(*hub, "run", model_type=None, template=None, settings=settings,
                         info=None).output_dir == settings.OUTPUT_ROOT.resolve() / "run"  # fmt: skip


def test_a_data_set_folder_may_not_hold_links_out_of_the_data_roots(tmp_path: Path) -> None:
    # swift reads every file of a folder data set (val_dataset, cached_dataset, ...): a link in it to a file
    # outside DATA_ROOTS would have been read, and its rows printed in the job's log.
    settings = settings_for("redis://127.0.0.1:1/0", tmp_path, DATA_ROOTS=str(tmp_path / "data"))
    folder = tmp_path / "data" / "folder1"
    folder.mkdir(parents=True)
    (folder / "a.jsonl").write_text(json.dumps(MESSAGES) + "\n")
    (folder / "inner").symlink_to(folder / "a.jsonl")  # a link that stays inside is fine
    hub = ("AI-ModelScope/alpaca-gpt4-data-en", "Qwen/Qwen2.5-0.5B-Instruct")
    for name in ("val_dataset", "cached_dataset", "dataset"):
        checked = check_request(*hub, "run", model_type=None, template=None, settings=settings, info=None,
                                arguments={name: ["folder1"]})  # fmt: skip
        assert checked.arguments[name] == [str(folder.resolve())]
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.jsonl").write_text(json.dumps(MESSAGES) + "\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "b.jsonl").symlink_to(tmp_path / "outside" / "secret.jsonl")
    for name in ("val_dataset", "cached_dataset", "dataset"):
        with pytest.raises(Invalid) as exc:
            check_request(*hub, "run", model_type=None, template=None, settings=settings, info=None,
                          arguments={name: ["folder1"]})  # fmt: skip
        assert exc.value.detail == (f"training.{name}[0]: 'sub/b.jsonl' in that folder is a link that leads outside "
                                    "DATA_ROOTS: swift would read it; name the data files instead")  # fmt: skip
    # A link to another folder inside the roots is followed (hub loaders follow it), and a loop ends.
    (folder / "sub" / "b.jsonl").unlink()
    other = tmp_path / "data" / "other"
    other.mkdir()
    (other / "back").symlink_to(folder, target_is_directory=True)
    (folder / "sub" / "to-other").symlink_to(other, target_is_directory=True)
    assert check_request(
        *hub,
        "run",
        model_type=None,
        template=None,
        settings=settings,
        info=None,
        arguments={"val_dataset": ["folder1"]},
    ).arguments["val_dataset"] == [str(folder.resolve())]
    (other / "leak.jsonl").symlink_to(tmp_path / "outside" / "secret.jsonl")
    with pytest.raises(Invalid, match=r"'sub/to-other/leak\.jsonl' in that folder is a link that leads outside"):
        check_request(*hub, "run", model_type=None, template=None, settings=settings, info=None,
                      arguments={"val_dataset": ["folder1"]})  # fmt: skip


def test_a_model_or_adapter_folder_may_not_hold_links_out_of_the_model_roots(tmp_path: Path) -> None:
    # Model folders were not walked: a file of one linking outside MODEL_ROOTS (or, file by file, into another
    # owner's checkpoint) was loaded by swift.
    settings = settings_for("redis://127.0.0.1:1/0", tmp_path, MODEL_ROOTS=str(tmp_path / "models"))
    model = make_model(tmp_path / "models" / "Qwen2.5-0.5B-Instruct")
    adapter = tmp_path / "models" / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "weights.safetensors").write_bytes(b"x")
    data = "AI-ModelScope/alpaca-gpt4-data-en"
    checked = check_request(data, str(model), "run", model_type=None, template=None, settings=settings, info=None,
                            arguments={"adapters": [str(adapter)]})  # fmt: skip
    assert checked.arguments["adapters"] == [str(adapter.resolve())]
    (adapter / "adapter_model.safetensors").symlink_to(tmp_path / "outside" / "weights.safetensors")
    with pytest.raises(Invalid) as exc:
        check_request(data, str(model), "run", model_type=None, template=None, settings=settings, info=None,
                      arguments={"adapters": [str(adapter)]})  # fmt: skip
    assert exc.value.detail == ("training.adapters[0]: 'adapter_model.safetensors' in that folder is a link that "
                                "leads outside MODEL_ROOTS or OUTPUT_ROOT: swift would read it; copy the files in "
                                "instead")  # fmt: skip
    (model / "model.safetensors").unlink(missing_ok=True)
    (model / "model.safetensors").symlink_to(tmp_path / "outside" / "weights.safetensors")
    with pytest.raises(Invalid, match=r"^model_path: 'model\.safetensors' in that folder is a link that leads out"):
        check_request(data, str(model), "run", model_type=None, template=None, settings=settings, info=None)
