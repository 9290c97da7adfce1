"""Media references in a data set's rows: inside DATA_ROOTS or inline, never a URL or a path out of the roots."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from application.exceptions import Invalid
from application.services.media_refs import BLOCK, SCAN_BLOCK, check_media, check_media_folder, media_columns
from tests.conftest import job_body, make_model

CHAT = [{"role": "user", "content": "<image>what is it?"}, {"role": "assistant", "content": "a cat"}]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def roots(tmp_path: Path) -> list[Path]:
    (tmp_path / "data" / "img").mkdir(parents=True)
    (tmp_path / "data" / "img" / "cat.png").write_bytes(b"png")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.png").write_bytes(b"png")
    return [tmp_path / "data"]


def test_text_rows_inline_data_relative_paths_and_files_in_the_roots_pass(tmp_path: Path, roots: list[Path]) -> None:
    rows: list[dict[str, Any]] = [
        {"messages": CHAT},
        {"messages": CHAT, "images": [str(tmp_path / "data" / "img" / "cat.png")]},
        {"messages": CHAT, "images": ["data:image/png;base64,iVBORw0KGgo="], "videos": "clips/a.mp4"},
        {"messages": CHAT, "images": [{"path": str(tmp_path / "data" / "img" / "cat.png"), "bytes": None}]},
    ]
    check_media("data_path", write_rows(tmp_path / "data" / "ok.jsonl", rows), roots, None)


@pytest.mark.parametrize(
    ("refs", "says"),
    [
        ({"images": ["OUTSIDE/secret.png"]}, "must be a file inside DATA_ROOTS"),
        ({"images": ["OUTSIDE/missing.png"]}, "must be a file inside DATA_ROOTS"),  # the same: existence not told
        ({"audios": "http://169.254.169.254/latest/meta-data/"}, "is a URL"),
        ({"Videos": ["../../../../etc/passwd"]}, "holds '..'"),
        ({"images": [{"path": "~/secret.png"}]}, "must be a file inside DATA_ROOTS"),
        # ms-swift strips a reference before it looks, and reads these columns too.
        ({"images": [" /etc/passwd"]}, "must be a file inside DATA_ROOTS"),
        ({"images": ["\t../x.png"]}, "holds '..'"),
        ({"rejected_videos": ["/etc/passwd"]}, "must be a file inside DATA_ROOTS"),
        ({"negative_images": [["/etc/passwd"]]}, "must be a file inside DATA_ROOTS"),
        ({"ref_audios": "https://10.0.0.1/a.wav"}, "is a URL"),
        ({"audios": ["concat:/srv/other/a.wav|/srv/other/b.wav"]}, "is a URL"),
    ],
)
def test_a_reference_out_of_the_roots_or_a_url_is_refused_naming_its_row(
    tmp_path: Path, roots: list[Path], refs: dict[str, Any], says: str
) -> None:
    refs = json.loads(json.dumps(refs).replace("OUTSIDE", str(tmp_path / "outside")))
    path = write_rows(tmp_path / "data" / "bad.jsonl", [{"messages": CHAT}, {"messages": CHAT, **refs}])
    with pytest.raises(Invalid) as exc:
        check_media("data_path", path, roots, None)
    assert "'bad.jsonl': line 2" in exc.value.detail and says in exc.value.detail, exc.value.detail


def test_rows_far_down_a_large_file_and_escaped_column_names_are_read(tmp_path: Path, roots: list[Path]) -> None:
    filler = json.dumps({"messages": CHAT}) + "\n"
    text = filler * (BLOCK // len(filler) + 10)
    # A column name spelled with \\u escapes is the same column to ms-swift's JSON reader.
    text += '{"messages": [], "\\u0069mages": ["' + str(tmp_path / "outside" / "secret.png") + '"]}\n'
    path = tmp_path / "data" / "big.jsonl"
    path.write_text(text)
    with pytest.raises(Invalid) as exc:
        check_media("data_path", path, roots, None)
    assert f"line {text.count(chr(10))}, 'images'" in exc.value.detail, exc.value.detail


@pytest.mark.parametrize("shift", range(-8, 9, 2))
def test_a_reference_across_the_scans_blocks_or_in_a_row_longer_than_one_is_found(
    tmp_path: Path, roots: list[Path], shift: int
) -> None:
    # The scan reads SCAN_BLOCK at a time (a search over 8 MiB held the GIL, stalling the API for 124 ms).
    ref = '"images": ["' + str(tmp_path / "outside" / "secret.png") + '"]}\n'
    pad = SCAN_BLOCK - len('{"messages": [], "x": "') - len('", ') + shift  # ("images" astride the boundary)
    first = '{"messages": [], "x": "' + "a" * pad + '", ' + ref
    long_row = '{"messages": [], "x": "' + "b" * (3 * SCAN_BLOCK) + '", ' + ref
    for name, text in (("astride.jsonl", first), ("long.jsonl", json.dumps({"messages": CHAT}) + "\n" + long_row)):
        path = tmp_path / "data" / name
        path.write_text(text)
        with pytest.raises(Invalid) as exc:
            check_media("data_path", path, roots, None)
        assert "'images'" in exc.value.detail and "line" in exc.value.detail, (name, exc.value.detail)


def test_json_arrays_and_csv_columns(tmp_path: Path, roots: list[Path]) -> None:
    array = tmp_path / "data" / "rows.json"
    array.write_text(json.dumps([{"messages": CHAT}, {"messages": CHAT, "images": ["https://example.com/a.png"]}]))
    with pytest.raises(Invalid) as exc:
        check_media("data_path", array, roots, None)
    assert "element 2, 'images'" in exc.value.detail and "is a URL" in exc.value.detail
    table = tmp_path / "data" / "rows.csv"
    table.write_text("query,response,images\nhi,there,/etc/passwd\n")
    with pytest.raises(Invalid) as exc:
        check_media("data_path", table, roots, None)
    assert "give data sets with images, videos or audio as .jsonl" in exc.value.detail
    (tmp_path / "data" / "text.csv").write_text("query,response\nhi,there\n")
    check_media("data_path", tmp_path / "data" / "text.csv", roots, None)


def test_rows_no_path_can_be_made_of_are_refused_naming_where(tmp_path: Path, roots: list[Path]) -> None:
    surrogate = tmp_path / "data" / "s.jsonl"  # JSON may spell a lone surrogate, which no file name holds
    surrogate.write_text(json.dumps({"messages": CHAT, "images": ["/nowhere\ud800/a.png"]}) + "\n")
    with pytest.raises(Invalid) as exc:
        check_media("data_path", surrogate, roots, None)
    assert "line 1, 'images'" in exc.value.detail and "U+D800" in exc.value.detail
    extra = tmp_path / "data" / "extra.csv"  # a marker word, so its rows are read
    extra.write_text("query,response\nhi,hello,see image\n")
    with pytest.raises(Invalid) as exc:
        check_media("data_path", extra, roots, None)
    assert "extra.csv" in exc.value.detail and "line 2 has more fields than the header" in exc.value.detail
    long = tmp_path / "data" / "long.csv"
    long.write_text(f'query,response\nsee the image,"{"x" * 200_000}"\n')
    check_media("data_path", long, roots, None)


def test_columns_mapped_to_media_and_image_blocks_in_messages_are_read(tmp_path: Path, roots: list[Path]) -> None:
    # The `columns` argument makes any column a media one; Anthropic-style content blocks carry a source URL.
    mapped = write_rows(tmp_path / "data" / "m.jsonl", [{"messages": CHAT, "pic": ["/etc/hostname"]}])
    check_media("data_path", mapped, roots, None)  # an ordinary column
    with pytest.raises(Invalid, match="line 1, 'pic'"):
        check_media("data_path", mapped, roots, None, media_columns({"columns": {"pic": "Images"}}))
    block = {"type": "image", "source": {"type": "url", "url": "http://10.0.0.1/x.png"}}
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "what?"}, block]},
                          {"role": "assistant", "content": "x"}]}]  # fmt: skip
    with pytest.raises(Invalid, match=r"line 1, 'source'.*is a URL"):
        check_media("data_path", write_rows(tmp_path / "data" / "a.jsonl", rows), roots, None)


@pytest.mark.parametrize(
    "block",
    [
        {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data/"}},
        {"type": "image", "image": "/etc/passwd"},
        {"type": "video", "video": "file:///etc/passwd"},
    ],
)
def test_content_blocks_in_messages_are_read(tmp_path: Path, roots: list[Path], block: dict[str, Any]) -> None:
    rows = [{"messages": [{"role": "user", "content": [block, {"type": "text", "text": "hi"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "x"}]}]}]  # fmt: skip
    with pytest.raises(Invalid, match="line 1"):
        check_media("data_path", write_rows(tmp_path / "data" / "b.jsonl", rows), roots, None)


def test_text_that_mentions_images_and_long_inline_data_pass(tmp_path: Path, roots: list[Path]) -> None:
    talk = [{"role": "user", "content": 'What is an "image"? Say \u00e9.'}, {"role": "assistant", "content": "x"}]
    inline = "/9j/" + "A" * 4000  # raw base64 (a JPEG's) past ms-swift's 2,000-character path limit
    rows: list[dict[str, Any]] = [{"messages": talk}, {"messages": CHAT, "images": [inline]}]
    check_media("data_path", write_rows(tmp_path / "data" / "t.jsonl", rows), roots, None)
    array = tmp_path / "data" / "t.json"
    array.write_text(json.dumps([{"messages": talk}] * 3 + [{"messages": CHAT, "images": ["x/../../y.png"]}]))
    with pytest.raises(Invalid, match="element 4, 'images'"):
        check_media("data_path", array, roots, None)


@pytest.mark.parametrize(
    ("row", "says"),
    [
        # History and messages given as text: ms-swift parses them (JSON, else a Python literal).
        ({"query": "hi", "response": "x",
          "history": "[[[{'type': 'image', 'image': '/etc/passwd'}, {'type': 'text', 'text': 'what?'}], 'ok']]"},
         "must be a file inside DATA_ROOTS"),
        ({"messages": "[{'role': 'user', 'content': [{'type': 'image', 'source': {'type': 'url', "
                      "'url': 'http://169.254.169.254/'}}]}, {'role': 'assistant', 'content': 'x'}]"}, "is a URL"),
        # The templates of multimodal models load <img>path</img> written in a message.
        ({"messages": [{"role": "user", "content": "look: <img>/etc/passwd</img>"},
                       {"role": "assistant", "content": "x"}]}, "'<img>': '/etc/passwd' must be a file inside"),
        # ...also once ms-swift has joined a message's blocks, or dumped a tool call as JSON.
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "describe <im"},
                                                    {"type": "text", "text": "g>/etc/hostname</img>"}]},
                       {"role": "assistant", "content": "x"}]}, "'<img>': '/etc/hostname' must be a file inside"),
        ({"messages": [{"role": "user",
                        "content": [{"type": "img>/etc/hostname</img"}, {"type": "text", "text": "hi"}]},
                       {"role": "assistant", "content": "x"}]}, "'<img>': '/etc/hostname' must be a file inside"),
        ({"messages": [{"role": "user", "content": "hi"},
                       {"role": "tool_call", "content": {"name": "f", "arguments": {"<img>/etc/hostname</img>": 1}}},
                       {"role": "tool_response", "content": "x"}, {"role": "assistant", "content": "ok"}]},
         "'<img>': '/etc/hostname' must be a file inside"),
        # ms-swift normalizes what it did not find as a path: 'data:/../../x' is /x to it.
        ({"messages": CHAT, "images": ["data:/../../../../../../etc/passwd"]}, "holds '..'"),
    ],
)  # fmt: skip
def test_media_hidden_in_text_or_behind_a_data_prefix_is_found(
    tmp_path: Path, roots: list[Path], row: dict[str, Any], says: str
) -> None:
    with pytest.raises(Invalid) as exc:
        check_media("data_path", write_rows(tmp_path / "data" / "h.jsonl", [row]), roots, None)
    assert says in exc.value.detail, exc.value.detail


def test_a_column_mapped_by_the_columns_argument_as_it_reaches_the_check(tmp_path: Path, roots: list[Path]) -> None:
    from application.services.swift_arguments import check_arguments
    from tests.test_swift_arguments import V4

    arguments = check_arguments("sft", {"columns": {"pic": "images"}}, V4)  # JSON text, as the create stores it
    assert isinstance(arguments["columns"], str)
    path = write_rows(tmp_path / "data" / "c.jsonl", [{"messages": CHAT, "pic": ["/etc/passwd"]}])
    with pytest.raises(Invalid, match="line 1, 'pic'"):
        check_media("data_path", path, roots, None, media_columns(arguments))


def test_a_folder_data_set_has_each_data_file_checked(tmp_path: Path, roots: list[Path]) -> None:
    folder = tmp_path / "data" / "set"
    (folder / "part").mkdir(parents=True)
    write_rows(folder / "a.jsonl", [{"messages": CHAT}])
    write_rows(folder / "part" / "b.jsonl", [{"messages": CHAT, "images": ["/etc/passwd"]}])
    with pytest.raises(Invalid, match="must be a file inside DATA_ROOTS"):
        check_media_folder("training.dataset", folder, roots, None)
    (folder / "part" / "b.jsonl").unlink()
    check_media_folder("training.dataset", folder, roots, None)
    (folder / "c.parquet").write_bytes(b"PAR1")
    with pytest.raises(Invalid, match=r"c\.parquet, whose rows the server cannot check"):
        check_media_folder("training.dataset", folder, roots, None)


def test_a_folder_data_set_counts_its_data_files_not_its_images(
    tmp_path: Path, roots: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image data set laid out as a folder (its rows beside 10,001 images) was refused as holding "more than
    10000 files", though the README promises 100,000 looked at: only the data files it reads count."""
    from application.services import media_refs

    folder = tmp_path / "data" / "set"
    (folder / "images").mkdir(parents=True)
    for i in range(media_refs.FOLDER_FILES_MAX + 1):
        (folder / "images" / f"{i}.jpg").touch()
    write_rows(folder / "train.jsonl", [{"messages": CHAT, "images": [str(folder / "images" / "0.jpg")]}])
    check_media_folder("training.dataset", folder, roots, None)
    monkeypatch.setattr(media_refs, "FOLDER_FILES_MAX", 3)  # (as many data files as it takes, made quickly)
    for i in range(3):
        write_rows(folder / f"more{i}.jsonl", [{"messages": CHAT}])
    with pytest.raises(Invalid, match=r"more than 3 data files \(.jsonl, .json, .csv\)"):
        check_media_folder("training.dataset", folder, roots, None)
    monkeypatch.setattr(media_refs, "FOLDER_FILES_MAX", 10_000)
    monkeypatch.setattr(media_refs, "MAX_FOLDER_ENTRIES", 1_000)  # (a folder grown since the link check)
    with pytest.raises(Invalid, match="more than 1,000 files and folders"):
        check_media_folder("training.dataset", folder, roots, None)


def test_a_folder_data_set_has_the_data_files_behind_its_folder_links_checked_too(
    tmp_path: Path, roots: list[Path]
) -> None:
    """A link to another folder inside the roots passed the link check, and the walk did not follow it: the rows
    there could name any file as an image (review AK)."""
    other = tmp_path / "data" / "other"
    other.mkdir(parents=True)
    write_rows(other / "b.jsonl", [{"messages": CHAT, "images": ["/etc/passwd"]}])
    folder = tmp_path / "data" / "set"
    folder.mkdir()
    write_rows(folder / "a.jsonl", [{"messages": CHAT}])
    (folder / "more").symlink_to(other)
    (other / "up").symlink_to(folder)  # (a loop: each folder is read once)
    with pytest.raises(Invalid, match="/etc/passwd"):
        check_media_folder("training.dataset", folder, roots, None)
    (other / "b.jsonl").unlink()
    check_media_folder("training.dataset", folder, roots, None)


def test_another_owners_folder_is_refused_by_the_guard(tmp_path: Path, roots: list[Path]) -> None:
    seen: list[Path] = []

    def guard(field: str, value: str, real: Path) -> None:
        seen.append(real)
        raise Invalid(f"{field}: another owner's folder")

    cat = str(roots[0] / "img" / "cat.png")
    path = write_rows(tmp_path / "data" / "g.jsonl", [{"messages": CHAT, "images": [cat]}])
    with pytest.raises(Invalid, match="another owner's folder"):
        check_media("data_path", path, roots, guard)
    assert seen == [(roots[0] / "img" / "cat.png").resolve()]


async def test_a_job_on_rows_naming_a_file_out_of_the_roots_is_refused_before_it_is_stored(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # The file exists (outside DATA_ROOTS, which is tmp_path here); ms-swift would have read it into training.
    make_model(tmp_path / "models" / "tiny-qwen2")
    body = job_body(tmp_path, "img", auto_start=True)
    rows = Path(body["data_path"]).read_text().splitlines()
    rows.append(json.dumps({"messages": CHAT, "images": ["/etc/hostname"]}))
    Path(body["data_path"]).write_text("\n".join(rows) + "\n")
    async with app_factory() as client:
        r = await client.post("/jobs", json=body)
        assert r.status_code == 422 and "line 22, 'images'" in r.json()["detail"], r.text
        assert "must be a file inside DATA_ROOTS" in r.json()["detail"]
        assert (await client.get("/jobs")).json()["total"] == 0


def test_a_data_set_gone_since_its_first_read_is_a_422_not_a_500(tmp_path: Path) -> None:
    # The data set check reads the file first; a delete of the upload in between made this an unhandled error.
    with pytest.raises(Invalid, match=r"data_path '.*gone.jsonl' cannot be read \(No such file or directory\)"):
        check_media("data_path", tmp_path / "gone.jsonl", [tmp_path], None)


def test_a_fifo_in_a_folder_data_set_is_refused_at_once_not_waited_on(tmp_path: Path, roots: list[Path]) -> None:
    # Opened as any file, a FIFO named like a data file held the create's worker thread for ever (a few such
    # creates took every thread an API worker has).
    import os

    from application.services.datasets import check_dataset

    folder = tmp_path / "data" / "set"
    folder.mkdir()
    write_rows(folder / "a.jsonl", [{"messages": CHAT}])
    os.mkfifo(folder / "b.jsonl")
    with pytest.raises(Invalid, match=r"b\.jsonl' cannot be read \(not a regular file\)"):
        check_media_folder("data_path", folder, roots, None)
    with pytest.raises(Invalid, match="is not a file"):
        check_dataset("data_path", folder / "b.jsonl")
