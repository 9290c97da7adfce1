"""What a local data set folder makes ms-swift read and write besides the files in it.

ms-swift loads a folder data set (`training.dataset`, `val_dataset`, ...) with Hugging Face `datasets`, whose
`load_dataset(folder)` takes the files to read from the folder's dataset card: the YAML header of its README.md
and a `.huggingface.yaml` beside it (`configs: [{data_files: ..., data_dir: ...}]`). Those are patterns relative
to the folder, but a `../`, an absolute path or a URL in them reads anywhere: another owner's uploads, the
server's own files, a host on its network (hunt BG). The folder's links are checked elsewhere
(`path_sandbox.check_folder_links`); this reads the card. And ms-swift renames a `dataset_infos.json` it finds
there to `dataset_infos.json_bak`, a write into a data root (a read-only one fails the run).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from application.exceptions import Invalid

CARD_FILES = ("README.md", ".huggingface.yaml")  # datasets' REPOCARD_FILENAME and REPOYAML_FILENAME
MAX_CARD_BYTES = 1 << 20
# The card's header: the YAML between a first line of --- and the next. huggingface_hub's own (1.33) takes a
# closing line with spaces or tabs after it, its older releases did not, and a later one may take more: each
# reading is checked (a header that only one of them finds hid a pattern: review BL).
_FRONT_MATTERS = (
    re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))"),  # huggingface_hub 1.33
    re.compile(r"^(\s*---[\r\n]+)([\S\s]*?)([\r\n]+---(\r\n|\n|$))"),
    re.compile(r"^(\s*---[ \t]*(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---)"),
)
# A pattern that reaches out of the folder: absolute, from a home folder, through `..`, or with a colon: a URL, an
# fsspec protocol or chain (`file:/abs`, `local:`, `zip::`, `hf://`), a drive.
_LEAVES = re.compile(r"^\s*[/\\~]|(^|[/\\])\.\.([/\\]|$)|:")


def check_data_folder(field: str, path: Path) -> None:
    """Raise Invalid when ms-swift, loading the folder `path` as a data set, would read files outside it (its
    dataset card says so) or rename a file in it."""
    try:
        if (path / "dataset_infos.json").is_file():
            raise Invalid(
                f"{field} '{path.name}' holds dataset_infos.json, which ms-swift renames (to "
                "dataset_infos.json_bak) when it loads the folder, writing into DATA_ROOTS: remove it "
                "from the folder (ms-swift does not read it), or name the folder's data files instead"
            )
        for name in CARD_FILES:
            card = path / name
            if not card.is_file():
                continue
            with card.open("rb") as f:
                raw = f.read(MAX_CARD_BYTES + 1)
            if len(raw) > MAX_CARD_BYTES:
                raise Invalid(
                    f"{field} '{path.name}': its {name} is over {MAX_CARD_BYTES >> 20} MiB, too big to "
                    "check which files it has the data set loader read: name the data files instead"
                )
            _check_card(field, path.name, name, raw.decode("utf-8", errors="replace"))
    except OSError as exc:
        raise Invalid(f"{field} '{path.name}' cannot be read ({exc.strerror})") from None


def _check_card(field: str, folder: str, name: str, text: str) -> None:
    if not name.endswith(".md"):
        _check_yaml(field, folder, name, text, strict=True)
        return
    for i, pattern in enumerate(_FRONT_MATTERS):
        if found := pattern.match(text):  # (none: no header, nothing for the loader in it)
            _check_yaml(field, folder, name, found.group(2), strict=i == 0)


def _check_yaml(field: str, folder: str, name: str, text: str, *, strict: bool) -> None:
    try:
        card = yaml.safe_load(text)
    except yaml.YAMLError:
        if not strict:
            return  # (another library's reading of the header: the loader's own is checked)
        raise Invalid(
            f"{field} '{folder}': the YAML of its {name} cannot be read, so which files the data set "
            "loader would take from it cannot be checked: fix it, or name the data files instead"
        ) from None
    for pattern in _patterns(card):
        if _LEAVES.search(pattern):
            raise Invalid(
                f"{field} '{folder}': its {name} has the data set loader read '{pattern[:200]}', outside "
                "the folder: a folder data set's data files must lie inside it (no '..', absolute path "
                "or URL), or name the data files instead"
            )


def _patterns(card: Any) -> Iterator[str]:
    """Every text of the card's `data_files` and `data_dir`, in its `configs` or at its top."""
    if not isinstance(card, dict):
        return
    configs = card.get("configs")
    for entry in [card, *(configs if isinstance(configs, list) else [configs])]:
        if isinstance(entry, dict):
            for key in ("data_files", "data_dir"):
                yield from _texts(entry.get(key))


def _texts(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _texts(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _texts(item)
    elif value is not None:
        yield str(value)
