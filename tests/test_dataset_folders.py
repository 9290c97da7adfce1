"""A folder data set's dataset card may not have the loader read outside the folder (hunt BG: a README.md whose
YAML header named `../uploads/bob/*.jsonl` had swift train alice's job on bob's uploads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from application.exceptions import Invalid
from application.services.path_sandbox import relinked_folder
from application.services.preflight import check_request
from tests.conftest import settings_for

MESSAGES = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
HUB = ("AI-ModelScope/alpaca-gpt4-data-en", "Qwen/Qwen2.5-0.5B-Instruct")


def check(tmp_path: Path, name: str = "dataset") -> list[str]:
    settings = settings_for("redis://127.0.0.1:1/0", tmp_path, DATA_ROOTS=str(tmp_path / "data"),
                            DATA_DIR=tmp_path / "server")  # fmt: skip
    checked = check_request(*HUB, "run", model_type=None, template=None, settings=settings, info=None,
                            arguments={name: ["f"]})  # fmt: skip
    return list(checked.arguments[name])


def folder(tmp_path: Path, card: str | None = None, card_name: str = "README.md") -> Path:
    f = tmp_path / "data" / "f"
    (f / "data").mkdir(parents=True, exist_ok=True)
    (f / "data" / "train-0.jsonl").write_text(json.dumps(MESSAGES) + "\n")
    if card is not None:
        (f / card_name).write_text(card)
    return f


def refused(tmp_path: Path, name: str = "dataset") -> str:
    with pytest.raises(Invalid) as exc:
        check(tmp_path, name)
    return str(exc.value.detail)


def test_a_card_whose_data_files_stay_in_the_folder_is_taken(tmp_path: Path) -> None:
    # A Hugging Face snapshot as downloaded: its card names its own files.
    f = folder(tmp_path, "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                         "    path: data/train-*.jsonl\n---\n# A data set\n\nSome text with ../ in it.\n")  # fmt: skip
    assert check(tmp_path) == [str(f.resolve())]
    (f / "README.md").write_text("# No header\n\ndata_files: ../elsewhere\n")  # (prose: not read by the loader)
    assert check(tmp_path, "val_dataset") == [str(f.resolve())]


@pytest.mark.parametrize("card", [
    "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: ../uploads/bob/*.jsonl\n---\n",
    "---\nconfigs:\n- config_name: default\n  data_files: /srv/secret/*.jsonl\n---\n",
    "---\nconfigs:\n- config_name: default\n  data_files:\n    train: [data/a.jsonl, 'https://intranet/x.jsonl']\n---\n",
    "---\nconfigs:\n- config_name: default\n  data_dir: data/../../other\n---\n",
    "---\nconfigs:\n- config_name: x\n  data_files: 'zip://*.jsonl::data/a.zip'\n---\n",
    "---\ndata_files: ~/x.jsonl\n---\n",
    # An fsspec protocol reads the absolute path after it (review BL).
    "---\nconfigs:\n- config_name: x\n  data_files:\n  - split: train\n    path: 'file:/srv/up/*.jsonl'\n---\n",
    "---\nconfigs:\n- config_name: default\n  data_files: [data/a.jsonl, 'local:/srv/s.jsonl']\n---\n",
    # A closing line with spaces or a tab after it ends the header for huggingface_hub (review BL).
    "---\nconfigs:\n- config_name: default\n  data_files: ../../secret/s.jsonl\n--- \n",
    "---\nconfigs:\n- config_name: default\n  data_files: ../../secret/s.jsonl\n---\t\n# text\n",
])  # fmt: skip
def test_a_card_that_has_the_loader_read_outside_the_folder_is_refused(tmp_path: Path, card: str) -> None:
    folder(tmp_path, card)
    assert "outside the folder: a folder data set's data files must lie inside it" in refused(tmp_path)


def test_the_standalone_yaml_card_is_read_too(tmp_path: Path) -> None:
    folder(tmp_path, "configs:\n- config_name: default\n  data_files: ../../etc/*.json\n", ".huggingface.yaml")
    assert "its .huggingface.yaml has the data set loader read '../../etc/*.json'" in refused(tmp_path, "val_dataset")


def test_a_card_that_cannot_be_read_is_refused(tmp_path: Path) -> None:
    folder(tmp_path, "---\nconfigs: [unclosed\n---\n")
    assert "the YAML of its README.md cannot be read" in refused(tmp_path)


def test_a_folder_with_dataset_infos_json_is_refused_since_swift_renames_it(tmp_path: Path) -> None:
    f = folder(tmp_path)
    (f / "dataset_infos.json").write_text("{}")
    assert "holds dataset_infos.json, which ms-swift renames" in refused(tmp_path)
    assert (f / "dataset_infos.json").is_file()


def test_a_card_changed_after_the_create_is_read_again_before_the_run(tmp_path: Path) -> None:
    f = folder(tmp_path, "---\nconfigs:\n- config_name: default\n  data_files: data/*.jsonl\n---\n")
    inputs = [("training.dataset[0]", str(f), True)]
    assert relinked_folder(inputs, [tmp_path / "data"], [], None) is None
    (f / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files: ../../x/*.jsonl\n---\n")
    why = relinked_folder(inputs, [tmp_path / "data"], [], None)
    assert why is not None and "changed since the job was created" in why and "outside the folder" in why, why
