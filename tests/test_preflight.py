"""Pre-flight checks: a data set or model ms-swift could not use is refused at create, naming what is wrong."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from application.exceptions import Invalid
from application.services.dataset_rows import data_needs
from application.services.preflight import check_model, check_request, runs_inline
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


def test_columns_are_renamed_as_swift_does_before_a_row_is_judged(tmp_path: Path) -> None:
    # ms-swift renames the `columns` of every data set before reading a row: these trained, and were refused.
    settings = settings_for("redis://127.0.0.1:1/0", tmp_path)
    dpo = write(tmp_path / "dpo.jsonl", [{"prompt": "hi", "chosen": "hello", "rejected": "go away"}] * 2)
    kto = write(tmp_path / "kto.jsonl", [{"query": "hi", "response": "hello", "is_good": True}] * 2)
    model = "Qwen/Qwen2.5-0.5B-Instruct"

    def check(data: Path, needs: Any, columns: dict[str, str], **extra: Any) -> int | None:
        arguments = {"columns": json.dumps(columns), **extra}
        found = check_request(str(data), model, "run", model_type=None, template=None, settings=settings,
                              info=None, needs=needs, arguments=arguments)  # fmt: skip
        return found.dataset.rows if found.dataset else None

    assert check(dpo, data_needs("rlhf", "dpo"), {"CHOSEN": "response", "rejected": "rejected_response"}) == 2
    assert check(kto, data_needs("rlhf", "kto"), {"is_good": "label"}, val_dataset=str(kto)) == 2
    # A mapping that renames a needed column away is refused now rather than after the wait.
    with pytest.raises(Invalid, match="preference training needs a rejected answer"):
        check(dpo, "rejected", {"chosen": "response", "rejected": "other"})
    # Two columns renamed to one name: swift renames neither.
    with pytest.raises(Invalid, match="no columns ms-swift can train on"):
        check(dpo, "rejected", {"chosen": "response", "prompt": "response", "rejected": "rejected_response"})


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


def test_a_fifo_among_a_model_folders_files_is_not_waited_on(tmp_path: Path, swift_4_6: SwiftInfo) -> None:
    # Its args.json, read as any file, held the create's worker thread for ever.
    import os

    folder = tmp_path / "my-model"  # (a name ms-swift does not know: it looks in args.json next)
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (folder / "tokenizer_config.json").write_text("{}")
    os.mkfifo(folder / "args.json")
    with pytest.raises(Invalid, match=r"training\.model_type"):
        check_model("model_path", folder, None, None, swift_4_6)


def test_ms_swift_must_be_able_to_tell_the_type_and_template(tmp_path: Path, swift_4_6: SwiftInfo) -> None:
    # The real ms-swift 4.6.0 fails on exactly these (fixtures fail_no_model_type / fail_no_template).
    tiny = make_model(tmp_path / "tiny-qwen2")
    with pytest.raises(Invalid) as exc:
        check_model("model_path", tiny, None, None, swift_4_6)
    assert "training.model_type (one of qwen2, qwen2_gte)" in exc.value.detail
    # ...and each one's templates, so that one answer names all there is to set.
    assert "training.template (qwen2: one of qwen, qwen2_5," in exc.value.detail
    assert "qwen2_gte: dummy)" in exc.value.detail
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


async def test_the_servers_own_files_are_no_ones_data_set_or_model_whatever_the_roots_hold(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # A data root holding API_KEYS_FILE (here: the data root holds everything) let a user key train on the key
    # file: the data set check told its names, and the run's log would have shown its first rows.
    model = make_model(tmp_path / "models" / "tiny-qwen2")
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"root": {"role": "admin", "key": "root-key-0123456789abcdef"},
                                "bob": {"role": "user", "key": "bob-key-0123456789abcdef"}}))  # fmt: skip
    (tmp_path / "logs").mkdir()
    logged = write(tmp_path / "logs" / "rows.jsonl", [MESSAGES] * 3)
    cases = {"keys": (str(keys), "API_KEYS_FILE"), "logs": (str(logged), "LOG_DIR"),
             "probe": ("data/swift-probe/x.jsonl", "DATA_DIR")}  # fmt: skip
    async with app_factory(API_KEYS_FILE=str(keys)) as client:
        for who in ({"Authorization": "Bearer bob-key-0123456789abcdef"},
                    {"Authorization": "Bearer root-key-0123456789abcdef"}):  # fmt: skip
            for name, (path, setting) in cases.items():
                body = {"data_path": path, "model_path": str(model), "output_dir": name}
                r = await client.post("/jobs", json=body, headers=who)
                assert r.status_code == 422, r.text
                assert r.json()["detail"] == (f"data_path '{path}' lies in the server's own files ({setting}): name "
                                              "a data set or model of your own")  # fmt: skip
            r = await client.post("/jobs", headers=who, json={"data_path": "AI-ModelScope/alpaca-gpt4-data-en",
                                                              "model_path": str(keys.parent / "data"),
                                                              "output_dir": "m"})  # fmt: skip
            assert r.status_code == 422 and "(DATA_DIR)" in r.json()["detail"], r.text
        assert (await client.get("/jobs", headers=who)).json()["total"] == 0


def test_the_servers_own_files_stay_its_own_in_a_folder_or_a_media_reference_and_roots_inside_them_are_users(
    tmp_path: Path,
) -> None:
    # The review of the first guard: a folder holding the key file (val_dataset) passed, and so did the key file
    # named as an image after another file of its folder; and a data root inside DATA_DIR refused everything.
    keys = tmp_path / "data" / "cfg" / "keys.json"
    keys.parent.mkdir(parents=True)
    keys.write_text(json.dumps({"root": {"role": "admin", "key": "root-key-0123456789abcdef"}}))
    settings = settings_for("redis://127.0.0.1:1/0", tmp_path, DATA_ROOTS=str(tmp_path / "data"),
                            DATA_DIR=tmp_path / "server", API_KEYS_FILE=str(keys))  # fmt: skip
    hub = ("AI-ModelScope/alpaca-gpt4-data-en", "Qwen/Qwen2.5-0.5B-Instruct")
    with pytest.raises(Invalid) as exc:
        check_request(*hub, "run", model_type=None, template=None, settings=settings, info=None,
                      arguments={"val_dataset": ["cfg"]})  # fmt: skip
    assert exc.value.detail == ("training.val_dataset[0] 'cfg' holds the server's own files (API_KEYS_FILE): name a "
                                "folder of your own data or model")  # fmt: skip
    (keys.parent / "a.png").write_bytes(b"png")
    rows = [{**MESSAGES, "images": [str(keys.parent / name)]} for name in ("a.png", "keys.json")]
    data = write(tmp_path / "data" / "pictures.jsonl", rows)
    with pytest.raises(Invalid) as exc:
        check_request(str(data), hub[1], "run", model_type=None, template=None, settings=settings, info=None)
    assert "lies in the server's own files (API_KEYS_FILE)" in exc.value.detail

    # DATA_DIR=/srv/swift with DATA_ROOTS=/srv/swift/datasets: the data sets there are the users'.
    inside = settings_for(
        "redis://127.0.0.1:1/0",
        tmp_path / "srv",
        DATA_DIR=tmp_path / "srv",
        DATA_ROOTS=str(tmp_path / "srv" / "datasets"),
        MODEL_ROOTS=str(tmp_path / "srv" / "models"),
    )
    (tmp_path / "srv" / "datasets").mkdir(parents=True)
    ours = write(tmp_path / "srv" / "datasets" / "t.jsonl", [MESSAGES])
    assert check_request(str(ours), hub[1], "run", model_type=None, template=None, settings=inside,
                         info=None).data_path == str(ours)  # fmt: skip


def test_a_hub_models_type_and_template_are_checked_too(tmp_path: Path, swift_4_6: SwiftInfo) -> None:
    # Only a local model's were: a typo (or '--output_dir', which swift then read as an option) waited its turn
    # and failed at its start.
    from application.models.job_request import TrainingParams

    settings = settings_for("redis://127.0.0.1:1/0", tmp_path)
    data = write(tmp_path / "d.jsonl", [MESSAGES])
    hub = "Qwen/Qwen2.5-0.5B-Instruct"
    for model_type, template, says in (("qwen2_55", None, r"is not a model type of ms-swift 4.6.0 \(did you mean"),
                                       ("qwen2", "qwen25", "is not a template of ms-swift 4.6.0")):  # fmt: skip
        with pytest.raises(Invalid, match=says):
            check_request(str(data), hub, "run", model_type=model_type, template=template, settings=settings,
                          info=swift_4_6)  # fmt: skip
    check_request(str(data), hub, "run", model_type="qwen2", template="qwen2_5", settings=settings, info=swift_4_6)
    for field in ("model_type", "template"):
        with pytest.raises(ValueError, match="should match pattern"):
            TrainingParams.model_validate({field: "--output_dir"})


def test_only_a_hub_only_request_on_a_local_disk_is_checked_without_a_thread() -> None:
    hub = ("AI-ModelScope/alpaca-gpt4-data-en#500", "Qwen/Qwen2.5-0.5B-Instruct")
    assert runs_inline(*hub, {"val_dataset": ["swift/self-cognition"]}, output_on_local_disk=True)
    assert not runs_inline(*hub, {}, output_on_local_disk=False)
    assert not runs_inline("./train.jsonl", hub[1], {}, output_on_local_disk=True)
    assert not runs_inline(hub[0], hub[1], {"val_dataset": ["swift/x", "team/val.jsonl"]}, output_on_local_disk=True)
    assert not runs_inline(hub[0], "~/models/qwen", {}, output_on_local_disk=True)
    # A hub id in a namespace named as a root is looked for in that root: on the disk, so in a thread.
    assert not runs_inline(hub[0], "models/qwen", {}, output_on_local_disk=True, roots=frozenset({"models"}))
    assert runs_inline(hub[0], "models/qwen", {}, output_on_local_disk=True, roots=frozenset({"datasets"}))


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
    settings = settings_for(
        "redis://127.0.0.1:1/0", tmp_path, DATA_ROOTS=str(tmp_path / "data"), DATA_DIR=tmp_path / "server"
    )
    folder = tmp_path / "data" / "folder1"
    folder.mkdir(parents=True)
    (folder / "a.jsonl").write_text(json.dumps(MESSAGES) + "\n")
    (folder / "inner").symlink_to(folder / "a.jsonl")  # a link that stays inside is fine
    hub = ("AI-ModelScope/alpaca-gpt4-data-en", "Qwen/Qwen2.5-0.5B-Instruct")
    for name in ("val_dataset", "dataset"):
        checked = check_request(*hub, "run", model_type=None, template=None, settings=settings, info=None,
                                arguments={name: ["folder1"]})  # fmt: skip
        assert checked.arguments[name] == [str(folder.resolve())]
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.jsonl").write_text(json.dumps(MESSAGES) + "\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "b.jsonl").symlink_to(tmp_path / "outside" / "secret.jsonl")
    for name in ("val_dataset", "dataset"):
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


def test_a_cached_data_set_is_the_folder_swift_export_writes(tmp_path: Path) -> None:
    # ms-swift reads it with load_from_disk: a save_to_disk folder (token ids in .arrow files, no media). Such a
    # folder was refused (its .arrow files "cannot be checked"), and a .jsonl file or a hub id was taken, to fail
    # after the wait.
    settings = settings_for(
        "redis://127.0.0.1:1/0", tmp_path, DATA_ROOTS=str(tmp_path / "data"), DATA_DIR=tmp_path / "server"
    )
    cached = tmp_path / "data" / "cached"
    for part in ("train", "val"):
        (cached / part).mkdir(parents=True)
        for name in ("data-00000-of-00001.arrow", "dataset_info.json"):
            (cached / part / name).write_text("{}")
        (cached / part / "state.json").write_text(json.dumps({"_data_files": [
            {"filename": "data-00000-of-00001.arrow"}], "_fingerprint": "x"}))  # fmt: skip
    write(tmp_path / "data" / "train.jsonl", [MESSAGES])
    hub = ("AI-ModelScope/alpaca-gpt4-data-en", "Qwen/Qwen2.5-0.5B-Instruct")

    def check(name: str, value: str) -> Any:
        return check_request(*hub, "run", model_type=None, template=None, settings=settings, info=None,
                             arguments={name: [value]}).arguments[name]  # fmt: skip

    assert check("cached_dataset", "cached/train") == [str((cached / "train").resolve())]
    assert check("cached_val_dataset", "cached/val#10") == [str((cached / "val").resolve()) + "#10"]
    (tmp_path / "data" / "split" / "train").mkdir(parents=True)
    (tmp_path / "data" / "split" / "dataset_dict.json").write_text('{"splits": ["train"]}')  # (a DatasetDict's)
    for value in ("cached", "train.jsonl", "split"):
        with pytest.raises(Invalid, match="is not a folder `swift export --to_cached_dataset` wrote"):
            check("cached_dataset", value)
    with pytest.raises(Invalid, match="is not a path that exists under DATA_ROOTS"):  # (no hub id)
        check("cached_dataset", "AI-ModelScope/alpaca-gpt4-data-en")
    # load_from_disk reads the files its state.json names: one outside the folder was read (any .arrow of the
    # host), and the run's error said whether a path existed.
    (tmp_path / "stolen.arrow").write_text("x")
    state = cached / "train" / "state.json"
    for name in (str(tmp_path / "stolen.arrow"), "../../../stolen.arrow", "sub/x.arrow", "missing.arrow"):
        state.write_text(json.dumps({"_data_files": [{"filename": name}]}))
        with pytest.raises(Invalid, match="which is no file of that folder"):
            check("cached_dataset", "cached/train")
    for text in ("{}", "not json", json.dumps({"_data_files": []})):
        state.write_text(text)
        with pytest.raises(Invalid, match="is not one save_to_disk wrote"):
            check("cached_dataset", "cached/train")
    state.write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    with pytest.raises(Invalid, match=r"must be inside DATA_ROOTS \([^)]*\)$"):  # (no hub id offered)
        check("cached_dataset", "/etc")
    # Its links are checked as any folder's.
    (tmp_path / "secret.arrow").write_text("x")
    (cached / "train" / "data-00001-of-00001.arrow").symlink_to(tmp_path / "secret.arrow")
    with pytest.raises(Invalid, match="is a link that leads outside DATA_ROOTS"):
        check("cached_dataset", "cached/train")


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
