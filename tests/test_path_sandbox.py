"""Local paths stay inside their roots; hub ids are never looked up; bad path text never reaches the disk."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from application.exceptions import Invalid
from application.services import path_sandbox
from application.services.path_sandbox import (
    RealFolder,
    check_text,
    escaped_output_root,
    relinked_input,
    resolve,
    resolve_output_dir,
)
from tests.conftest import fake_dataset, make_model


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    data = tmp_path / "datasets"
    (data / "team").mkdir(parents=True)
    (data / "team" / "train.jsonl").write_text('{"query": "q", "response": "r"}\n')
    (data / "top.jsonl").write_text('{"query": "q", "response": "r"}\n')
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "shadow.jsonl").write_text("top secret\n")
    (data / "escape").symlink_to(secret, target_is_directory=True)
    return {"data": data, "secret": secret, "base": tmp_path}


def data(value: str, r: dict[str, Path]) -> path_sandbox.Resolved:
    return resolve("data_path", value, [r["data"]], data=True, base=r["base"], setting="DATA_ROOTS")


@pytest.mark.parametrize("value", ["ns/name#0", "top.jsonl#0", "./datasets/top.jsonl#00", "/etc/shadow#0"])
def test_a_sample_of_no_rows_is_refused_before_any_path_is_looked_at(roots: dict[str, Path], value: str) -> None:
    # swift asserts a sample above 0: the job failed after its wait with a bare AssertionError.
    with pytest.raises(Invalid) as exc:
        data(value, roots)
    assert exc.value.detail == (f"data_path '{value}' asks for 0 rows (#0): write #N with N of 1 or more to train "
                                "on N rows, or leave #N out for the whole data set")  # fmt: skip


def test_hub_ids_pass_untouched_and_local_paths_resolve_inside_roots(roots: dict[str, Path]) -> None:
    for hub in ("AI-ModelScope/coco#20000", "swift/self-cognition:default#500", "ns/name"):
        assert data(hub, roots) == path_sandbox.Resolved(hub, False)
    inside = roots["data"] / "team" / "train.jsonl"
    assert data(str(inside), roots).path == inside
    assert data("./datasets/top.jsonl", roots).path == roots["data"] / "top.jsonl"
    assert data("team/train.jsonl", roots).path == inside  # relative to a root
    assert data("top.jsonl#100", roots).value == f"{roots['data'] / 'top.jsonl'}#100"
    # namespace/name.jsonl#N is a local file's sample too, not a hub id (swift went to the hub with it: hunt BG).
    assert data("team/train.jsonl#5", roots).value == f"{inside}#5"
    model = resolve("model_path", "Qwen/Qwen2.5-7B-Instruct", [roots["data"]], data=False, base=roots["base"],
                    setting="MODEL_ROOTS")  # fmt: skip
    assert model.local is False


@pytest.mark.parametrize(
    "value",
    ["/etc/shadow", "/etc/does-not-exist", "~", "~root/.ssh/id_rsa", "./secret/shadow.jsonl", "../x.jsonl", ".",
     "./datasets/escape/shadow.jsonl", "./datasets/../secret/shadow.jsonl", "./datasets/team/../../secret/x"],
)  # fmt: skip
def test_paths_outside_the_roots_are_refused_without_saying_whether_they_exist(
    roots: dict[str, Path], value: str
) -> None:
    with pytest.raises(Invalid) as exc:
        data(value, roots)
    assert exc.value.detail.startswith("data_path must be inside DATA_ROOTS (")
    assert "exist" not in exc.value.detail and "secret" not in exc.value.detail


def test_a_link_outside_the_roots_followed_by_dots_tells_nothing_of_it(roots: dict[str, Path]) -> None:
    # <a link outside>/../<a path into a root> resolves inside a root only when the link exists and points at
    # the right depth (/proc/<pid>/cwd/../..: whether a process runs, where): refused either way.
    outside = roots["base"] / "outside"
    outside.mkdir()
    (outside / "link").symlink_to(roots["data"] / "team", target_is_directory=True)
    answers = set()
    for link in ("link", "no-such-link"):
        with pytest.raises(Invalid) as exc:
            data(f"{outside}/{link}/../top.jsonl", roots)
        answers.add(exc.value.detail)
    assert len(answers) == 1 and answers.pop().startswith("data_path must be inside DATA_ROOTS (")
    # Dots that stay inside a root, and a link inside a root, are fine.
    assert data(f"{roots['data']}/team/../top.jsonl", roots).path == roots["data"] / "top.jsonl"
    (roots["data"] / "alias").symlink_to(roots["data"] / "team", target_is_directory=True)
    assert data("alias/train.jsonl", roots).path == roots["data"] / "team" / "train.jsonl"


def test_names_that_exist_nowhere_are_refused(roots: dict[str, Path]) -> None:
    for value in ("nothing.jsonl", "team/nothing.jsonl", "escape/shadow.jsonl", "plainword"):
        with pytest.raises(Invalid) as exc:
            data(value, roots)
        assert "neither a hub id" in exc.value.detail
    with pytest.raises(Invalid) as exc:
        data("./datasets/missing.jsonl", roots)
    assert "does not exist" in exc.value.detail  # inside a root, saying so reveals nothing


def test_joiners_inside_persian_and_indic_words_are_ordinary_text() -> None:
    for word in ("داده\u200cها.jsonl", "क्\u200dष/train.jsonl", "中文/数据.jsonl"):
        check_text("data_path", word)


@pytest.mark.parametrize(
    ("value", "words"),
    [("data\r.jsonl", "U+000D"), ("a\tb", "U+0009"), ("x\x1b[31m", "U+001B"), ("evil\u202egnp.jsonl", "U+202E"),
     ("del\x7f", "U+007F"), ("c1\x85", "U+0085"), ("bob\u200b1", "U+200B"), ("bob\u20601", "U+2060"),
     ("soft\u00adhyphen", "U+00AD"), ("line\u2028sep", "U+2028"), ("lone\ud800", "U+D800"),
     ("bob\u034f1", "U+034F"), ("bob\ufe001", "U+FE00"), ("bob\u31641", "U+3164"), ("bo\u200db1", "U+200D"),
     ("\u200cداده", "U+200C"),
     ("/" + "a" * 256, "longer than 255 bytes"),
     ("a/" * 65, "65 folder levels"), ("é" * 2100, "bytes long")],
)  # fmt: skip
def test_bad_path_text_is_refused_before_any_filesystem_call(
    roots: dict[str, Path], value: str, words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_disk(*_: Any, **__: Any) -> Any:
        raise AssertionError("the filesystem was touched")

    monkeypatch.setattr(os.path, "realpath", no_disk)
    monkeypatch.setattr(os, "stat", no_disk)
    with pytest.raises(Invalid) as exc:
        data(value, roots)
    assert words in exc.value.detail


def test_output_dir_stays_under_output_root(tmp_path: Path) -> None:
    root = tmp_path / "out"
    root.mkdir()
    assert resolve_output_dir("job1", root) == root / "job1"
    for bad in ("..", "../x", "/etc/x", ".", "a/" * 2000, "x\ry", "~/x", "~"):
        with pytest.raises(Invalid):
            resolve_output_dir(bad, root)
    # A link outside followed by dots back into OUTPUT_ROOT would tell where the link leads.
    (tmp_path / "elsewhere" / "deep").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere" / "deep", target_is_directory=True)
    for link in ("link", "no-such-link"):
        with pytest.raises(Invalid, match="outside OUTPUT_ROOT"):
            resolve_output_dir(f"{tmp_path}/{link}/../../out/job2", root)
    assert resolve_output_dir(f"{root}/a/../job3", root) == root / "job3"
    # OUTPUT_ROOT configured through a link: a path written with the link is fine.
    (tmp_path / "out-alias").symlink_to(root, target_is_directory=True)
    assert resolve_output_dir(f"{tmp_path}/out-alias/job4", tmp_path / "out-alias") == root / "job4"
    # Every part under 255 bytes and the text under 4096, but no room left for a run's files under the system's
    # path limit: its start failed ("File name too long") and, before that was caught, held up the queue.
    long = "/".join(["d" * 240] * 17)[:4000]
    with pytest.raises(Invalid, match="starts with '~': name a folder under OUTPUT_ROOT, such as x"):
        resolve_output_dir("~/x", root)  # a folder named '~' was made under OUTPUT_ROOT
    assert resolve_output_dir("x~", root) == root / "x~"
    with pytest.raises(Invalid, match="leave room for the files a run writes inside it"):
        resolve_output_dir(long, root)
    assert len(str(resolve_output_dir("/".join(["d" * 200] * 10), root))) < 4096 - 512


async def test_escapes_are_422_and_nothing_is_created_on_disk(app_factory: Callable[..., Any], tmp_path: Path) -> None:
    make_model(tmp_path / "models" / "tiny-qwen2")
    good = {"data_path": fake_dataset(tmp_path, "data"), "model_path": str(tmp_path / "models" / "tiny-qwen2"),
            "output_dir": "job"}  # fmt: skip
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "data.jsonl").write_text('{"query": "q", "response": "r"}\n')
    (tmp_path / "link").symlink_to(outside, target_is_directory=True)
    before = {p for p in tmp_path.rglob("*")}
    async with app_factory() as client:
        cases = [
            {"data_path": "/etc/shadow"}, {"data_path": str(outside / "data.jsonl")},
            {"data_path": str(tmp_path / "link" / "data.jsonl")}, {"data_path": "~/.bashrc"},
            {"model_path": "/root"}, {"model_path": "."}, {"model_path": str(tmp_path / "link")},
            {"data_path": "x\x00y"}, {"data_path": "a\u202e.jsonl"}, {"output_dir": "a/" * 2000},
            {"output_dir": "x" * 300}, {"model_path": "m/" * 70}, {"data_path": "d" * 300 + ".jsonl"},
            {"output_dir": "../../escape"}, {"output_dir": str(outside / "job")},
        ]  # fmt: skip
        for change in cases:
            r = await client.post("/jobs", json={**good, **change})
            assert r.status_code == 422, (change, r.text)
            detail = r.json()["detail"]
            echoed = any(str(outside) in str(v) for v in change.values())
            assert (echoed or str(outside) not in detail) and "does not exist" not in detail, (change, detail)
        assert (await client.get("/jobs")).json()["total"] == 0
        assert (await client.post("/jobs", json=good)).status_code == 201
    created = {p for p in tmp_path.rglob("*")} - before
    assert not any(p.is_relative_to(outside) for p in created)
    assert sorted(p.name for p in outside.iterdir()) == ["data.jsonl"]


def test_an_output_folder_is_checked_again_before_a_run_writes_there(tmp_path: Path) -> None:
    root, outside = tmp_path / "output", tmp_path / "elsewhere"
    (root / "kept").mkdir(parents=True)
    outside.mkdir()
    assert escaped_output_root(root / "kept", root) is None
    assert escaped_output_root(root / "not-made-yet" / "deeper", root) is None
    (root / "relinked").symlink_to(outside, target_is_directory=True)
    why = escaped_output_root(root / "relinked", root)
    assert why is not None and "outside OUTPUT_ROOT" in why and str(outside) in why
    assert escaped_output_root(root / "kept", tmp_path / "moved-root") is not None  # OUTPUT_ROOT moved
    # A link into another folder inside the root (another owner's job folder), made after the create.
    (root / "taken").symlink_to(root / "kept", target_is_directory=True)
    why = escaped_output_root(root / "taken", root)
    assert why is not None and "now leads to another folder" in why and str(root / "kept") not in why
    # OUTPUT_ROOT moved, a link left at its old place: records from before it still lead inside.
    (tmp_path / "new-root").mkdir()
    (root / "kept").rename(tmp_path / "new-root" / "kept")
    old_place = tmp_path / "old-root"
    old_place.symlink_to(tmp_path / "new-root", target_is_directory=True)
    assert escaped_output_root(old_place / "kept", tmp_path / "new-root") is None


def test_an_input_is_checked_again_before_each_run(tmp_path: Path) -> None:
    data, big, out = tmp_path / "data", tmp_path / "big", tmp_path / "output"
    (data / "team").mkdir(parents=True)
    (data / "team" / "t.jsonl").write_text("{}\n")
    (data / "uploads" / "bob").mkdir(parents=True)
    (data / "uploads" / "bob" / "file-1.jsonl").write_text("{}\n")
    big.mkdir()
    roots = ((data, big), (out,), (out, data / "uploads"))
    stored = str(data / "team" / "t.jsonl")
    inputs = [("data_path", stored + "#10", True), ("model_path", "Qwen/Qwen2.5-0.5B-Instruct", False)]
    assert relinked_input(inputs, *roots) is None
    (data / "team").rename(data / "team.kept")
    # A link on its way made since the create, out of the roots: refused, without naming where it leads.
    (tmp_path / "secret").mkdir()
    (data / "team").symlink_to(tmp_path / "secret", target_is_directory=True)
    why = relinked_input(inputs, *roots)
    assert why is not None and f"data_path {stored} now leads to another place" in why and "secret" not in why
    # ... or into another owner's uploads (whose files they are was checked at the create, for the path as it was).
    (data / "team").unlink()
    (data / "team").symlink_to(data / "uploads" / "bob", target_is_directory=True)
    (data / "uploads" / "bob" / "t.jsonl").write_text("{}\n")
    assert relinked_input(inputs, *roots) is not None
    # The data moved to new storage inside the roots, a link left at its old place: taken.
    (data / "team").unlink()
    (data / "team.kept").rename(big / "team")
    (data / "team").symlink_to(big / "team", target_is_directory=True)
    assert relinked_input(inputs, *roots) is None


def test_an_input_in_an_owned_area_that_moved_with_a_link_left_behind_is_the_same_file(tmp_path: Path) -> None:
    # Data roots moved to new storage (a link left at the old place): a waiting job's upload, or its model under
    # OUTPUT_ROOT, is the same file at the same path under the area, and no other owner's.
    data, out = tmp_path / "d1", tmp_path / "out"
    (data / "uploads" / "alice").mkdir(parents=True)
    (data / "uploads" / "alice" / "file-1.jsonl").write_text("{}\n")
    (data / "uploads" / "bob").mkdir()
    (out / "job" / "checkpoint-10").mkdir(parents=True)
    upload, model = str(data / "uploads" / "alice" / "file-1.jsonl"), str(out / "job" / "checkpoint-10")
    data.rename(tmp_path / "d1-new")
    data.symlink_to(tmp_path / "d1-new", target_is_directory=True)
    out.rename(tmp_path / "out-new")
    out.symlink_to(tmp_path / "out-new", target_is_directory=True)
    roots = ((data,), (out,), (out, data / "uploads"))
    assert relinked_input([("data_path", upload, True), ("model_path", model, False)], *roots) is None
    # The same with the settings naming the new places (review AM: a quantized export of a checkpoint stored under
    # the old OUTPUT_ROOT was refused after the README's move, which changes OUTPUT_ROOT and leaves a link).
    moved = ((tmp_path / "d1-new",), (tmp_path / "out-new",), (tmp_path / "out-new", tmp_path / "d1-new" / "uploads"))
    assert relinked_input([("data_path", upload, True), ("model_path", model, False)], *moved) is None
    # But not a link inside the area, made since, to another owner's files.
    (data / "uploads" / "alice").rename(data / "uploads" / "alice.kept")
    (data / "uploads" / "alice").symlink_to(data / "uploads" / "bob", target_is_directory=True)
    (data / "uploads" / "bob" / "file-1.jsonl").write_text("{}\n")
    assert relinked_input([("data_path", upload, True)], *roots) is not None


def test_a_real_folder_holds_what_lies_under_it_once_every_link_is_followed(tmp_path: Path) -> None:
    job = tmp_path / "out" / "job"
    (job / "v0" / "checkpoint-1").mkdir(parents=True)
    (tmp_path / "out" / "job2" / "checkpoint-1").mkdir(parents=True)
    (job / "away").symlink_to(tmp_path / "out" / "job2", target_is_directory=True)
    (tmp_path / "link-to-job").symlink_to(job, target_is_directory=True)
    folder = RealFolder(tmp_path / "link-to-job")  # the folder itself may be reached through a link
    assert folder.holds(job / "v0" / "checkpoint-1")
    assert folder.holds(str(job / "not-written-yet"))
    assert not folder.holds(job / "away" / "checkpoint-1")
    assert not folder.holds(tmp_path / "out" / "job2" / "checkpoint-1")  # a sibling sharing the name's start
    assert not folder.holds(job / ".." / "job2")
    assert not folder.holds(job)  # the folder is not under itself


def test_an_input_no_longer_inside_the_roots_which_changed_is_refused_before_the_run(tmp_path: Path) -> None:
    # An operator took a data root away (privacy): the jobs that waited to read it read it all the same, its path
    # resolving to itself whatever the roots (hunt AI).
    kept, dropped, out = tmp_path / "kept", tmp_path / "dropped", tmp_path / "output"
    for folder in (kept, dropped, out):
        folder.mkdir()
    (dropped / "t.jsonl").write_text("{}\n")
    inputs = [("data_path", str(dropped / "t.jsonl"), True)]
    assert relinked_input(inputs, (kept, dropped), (out,), (out,)) is None
    why = relinked_input(inputs, (kept,), (out,), (out,))
    assert why == (f"data_path {dropped / 't.jsonl'} is no longer inside DATA_ROOTS, which the server's operator "
                   "changed since the job was created: it runs again once DATA_ROOTS holds it (resume it then), or "
                   "create the job again with a path inside them")  # fmt: skip


@pytest.mark.parametrize("value", ["team/train.jsonl#3", "{data}/team/train.jsonl#3"])
def test_a_sample_whose_whole_name_is_a_file_is_refused(roots: dict[str, Path], value: str) -> None:
    # ms-swift reads `x.jsonl#3` as that file when it exists (DatasetSyntax.parse: os.path.exists first), so the
    # checked `x.jsonl` was not what it trained on; a link of that name led it out of the roots.
    value = value.format(data=roots["data"])
    (roots["data"] / "team" / "train.jsonl#3").symlink_to(roots["secret"] / "shadow.jsonl")
    with pytest.raises(Invalid, match="would read that one"):
        data(value, roots)
    assert data("team/train.jsonl#4", roots).value == f"{roots['data'] / 'team' / 'train.jsonl'}#4"


def test_a_sample_whose_whole_name_became_a_file_after_the_create_is_caught_before_the_run(
        roots: dict[str, Path]) -> None:  # fmt: skip
    stored = data("team/train.jsonl#3", roots).value
    assert relinked_input([("data_path", stored, True)], [roots["data"]], [], []) is None
    (roots["data"] / "team" / "train.jsonl#3").symlink_to(roots["secret"] / "shadow.jsonl")
    assert "would read it instead" in (relinked_input([("data_path", stored, True)], [roots["data"]], [], []) or "")


@pytest.mark.parametrize("sample", ["", "#3"])
def test_a_data_set_ms_swift_would_read_as_another_path_is_refused(roots: dict[str, Path], sample: str) -> None:
    # DatasetSyntax.parse splits a value that is not a path as a whole at its first `::` (hf::, ms::) and strips
    # blanks off what it reads: `<root>/a::<outside>/x.jsonl#3` read `<outside>/x.jsonl`, `<root>/set ` read
    # `<root>/set` (review EA).
    decoy = roots["data"] / ("a::" + str(roots["secret"]).lstrip("/")) / "shadow.jsonl"
    decoy.parent.mkdir(parents=True)
    decoy.write_text('{"query": "q", "response": "r"}\n')
    with pytest.raises(Invalid, match="holds '::'"):
        data(f"{decoy}{sample}", roots)
    (roots["data"] / "set ").mkdir()
    (roots["data"] / "set " / "t.jsonl").write_text('{"query": "q", "response": "r"}\n')
    with pytest.raises(Invalid, match="ends with a blank"):
        data(f"{roots['data'] / 'set '}{sample}", roots)


def test_a_data_set_with_a_colon_gone_since_the_create_is_caught_before_the_run(roots: dict[str, Path]) -> None:
    # Gone, `<root>/a:b/t.jsonl` is read by ms-swift as `<root>/a` (a subset's syntax): a folder no one checked.
    (roots["data"] / "a:b").mkdir()
    (roots["data"] / "a:b" / "t.jsonl").write_text('{"query": "q", "response": "r"}\n')
    stored = data("a:b/t.jsonl#3", roots).value
    assert relinked_input([("data_path", stored, True)], [roots["data"]], [], []) is None
    (roots["data"] / "a:b" / "t.jsonl").unlink()
    assert "is gone" in (relinked_input([("data_path", stored, True)], [roots["data"]], [], []) or "")


@pytest.mark.parametrize(("value", "local"), [("datasets/team", "team"), ("datasets/team#5", "team#5")])
def test_a_hub_id_naming_a_path_in_a_root_of_its_name_is_refused_with_the_local_spellings(
    roots: dict[str, Path], value: str, local: str
) -> None:
    # `models/tiny-qwen2` beside MODEL_ROOTS=./models, which held tiny-qwen2, was downloaded from the hub: the job
    # failed after its wait with a network error (hunt EO).
    with pytest.raises(Invalid) as exc:
        data(value, roots)
    assert exc.value.detail == (
        f"data_path '{value}' has the form of a hub id (namespace/name), which swift would download, but "
        f"DATA_ROOTS's folder {roots['data']} holds '{local.partition('#')[0]}': to use that, write '{local}' (a "
        f"path relative to DATA_ROOTS) or '{roots['data'] / local}'. A hub id that names a path in those folders "
        "this way cannot be used here"
    )
    assert data(local, roots).local  # (what it says to write is taken)
    with pytest.raises(Invalid, match="holds 'tiny-qwen2'"):
        make_model(roots["data"] / "tiny-qwen2")
        resolve("model_path", "datasets/tiny-qwen2", [roots["data"]], data=False, base=roots["base"],
                setting="MODEL_ROOTS")  # fmt: skip


@pytest.mark.parametrize("value", ["datasets/no-such-name", "datasets/team:default", "datasets/escape"])
def test_a_hub_id_in_a_namespace_named_as_a_root_is_one_when_that_root_holds_no_such_path(
    roots: dict[str, Path], value: str
) -> None:
    # (DATA_ROOTS=/srv/swift made `swift/self-cognition` a 422, with no way around it: review EQ. A subset is only
    # a hub's; a link out of the root is nothing of the root's.)
    assert data(value, roots) == path_sandbox.Resolved(value, False)


def test_another_owners_folder_named_so_is_refused_whether_it_exists(roots: dict[str, Path]) -> None:
    def guard(field: str, value: str, real: Path) -> None:
        if real.name.startswith("theirs"):
            raise Invalid(f"{field}: another owner's folder")

    (roots["data"] / "theirs").mkdir()
    for name in ("theirs", "theirs-not-there"):
        with pytest.raises(Invalid, match="another owner's folder"):
            resolve("data_path", f"datasets/{name}", [roots["data"]], data=True, base=roots["base"],
                    setting="DATA_ROOTS", guard=guard)  # fmt: skip
