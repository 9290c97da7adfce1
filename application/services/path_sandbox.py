"""Paths in requests: hub ids pass through untouched, local paths must resolve inside the configured roots.

Rules (README "Paths"):

* The text is checked first, before any filesystem call: no control characters (C0, C1, DEL) or bidi
  overrides, no component over 255 bytes, at most 64 components.
* Local: absolute, or starting with `./`, `../` or `~`. It must lie inside one of the roots as written (`..`
  collapsed) and once resolved (symlinks followed), else 422 naming the roots. Whether a path outside the
  roots exists is never looked at, so no answer can reveal it.
* Hub id: `namespace/name`, optionally `:subset` and `#N` for data sets. Never looked up on disk.
* Anything else is a path relative to the roots, used when it exists under one of them; else 422.

Everything here that touches the disk is synchronous and bounded: callers run it in a thread.
"""

from __future__ import annotations

import os
import re
import stat
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from application.exceptions import Invalid
from application.services.dataset_folders import check_data_folder

MAX_COMPONENTS = 64
MAX_COMPONENT_BYTES = 255
MAX_PATH_BYTES = 4096
MAX_FOLDER_ENTRIES = 100_000
# Room a run needs inside its output folder under the system's path limit: logs/<job id>.train.<n>.exit.json,
# swift's v0-<date>-<time>/checkpoint-<step>-merged/<file>, a quantized export's folder beside it.
OUTPUT_RESERVE_BYTES = 512

# Unicode's format characters (bidi marks, zero-width spaces and joiners, word joiner, soft hyphen, BOM: a path
# reads as another, "bob\u200b1" as "bob1"), line and paragraph separators, lone surrogates; and the blanks
# of other categories: combining grapheme joiner, variation selectors, Hangul fillers, the braille blank.
_INVISIBLE_CATEGORIES = frozenset({"Cf", "Zl", "Zp", "Cs"})
_BLANKS = frozenset([0x034F, 0x115F, 0x1160, 0x2800, 0x3164, 0xFFA0, *range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0)])
# Zero-width non-joiner and joiner: ordinary in Persian and Indic words ("داده‌ها"), so taken between two
# letters of such scripts (not between ASCII ones, where they would only hide).
_JOINERS = frozenset({0x200C, 0x200D})
_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
_MODEL_HUB_RE = re.compile(rf"^{_NAME}/{_NAME}$")
_DATA_HUB_RE = re.compile(rf"^{_NAME}/{_NAME}(?::{_NAME}(?:/{_NAME})*)?(?:#\d{{1,12}})?$")
_SAMPLE_RE = re.compile(r"#(\d{1,12})$")


def without_sample(value: str) -> str:
    """A data set's stored value without its `#N` sample count: the path itself."""
    return _SAMPLE_RE.sub("", value)


DATA_SUFFIXES = (".jsonl", ".json", ".csv")
# A name that ends like a file is a relative path, not a hub id ("team/train.jsonl").
_FILE_LIKE = (*DATA_SUFFIXES, ".txt", ".parquet", ".tsv", ".arrow")


@dataclass(frozen=True)
class Resolved:
    """What a path field means: a hub id (`local` False) or a real path inside a root."""

    value: str  # what swift gets: the hub id, or the resolved absolute path (plus `#N` for a data sample)
    local: bool
    path: Path | None = None
    sample: int | None = None


def _invisible(text: str, i: int, code: int) -> bool:
    if code in _JOINERS:
        return not (0 < i < len(text) - 1 and _script_letter(text[i - 1]) and _script_letter(text[i + 1]))
    return code in _BLANKS or unicodedata.category(text[i]) in _INVISIBLE_CATEGORIES


def _script_letter(ch: str) -> bool:
    return not ch.isascii() and unicodedata.category(ch)[0] in "LM"


def check_text(field: str, value: str) -> None:
    """Refuse path text no filesystem call should ever see; raises Invalid."""
    ascii_only = value.isascii()
    for i, ch in enumerate(value):
        code = ord(ch)
        if code < 0x20 or 0x7F <= code <= 0x9F or (not ascii_only and _invisible(value, i, code)):
            raise Invalid(
                f"{field} contains the control or invisible character U+{code:04X}: remove it "
                "(paths may not hold control characters, tabs, line breaks or bidi marks)"
            )
    encoded = value.encode("utf-8", "surrogatepass")
    if len(encoded) > MAX_PATH_BYTES:
        raise Invalid(f"{field} is {len(encoded)} bytes long: at most {MAX_PATH_BYTES} are allowed")
    parts = [p for p in value.split("/") if p]
    if len(parts) > MAX_COMPONENTS:
        raise Invalid(f"{field} has {len(parts)} folder levels: at most {MAX_COMPONENTS} are allowed")
    for part in parts:
        if len(part.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES:
            raise Invalid(f"{field} has a folder or file name longer than {MAX_COMPONENT_BYTES} bytes: shorten it")


def is_local_syntax(value: str) -> bool:
    return value in (".", "..", "~") or value.startswith(("/", "./", "../", "~"))


def is_hub_id(value: str, *, data: bool) -> bool:
    """A hub id (resolved without any filesystem call); a data set's may end in `:subset` and `#N`."""
    hub = _DATA_HUB_RE if data else _MODEL_HUB_RE
    return (
        not is_local_syntax(value)
        and hub.match(value) is not None
        # (`team/train.jsonl#5` is a local file's sample, as `team/train.jsonl` is the file)
        and not (data and _SAMPLE_RE.sub("", value).lower().endswith(_FILE_LIKE))
        and ".." not in value.split("/")
    )


class RealFolder:
    """A folder resolved once; `holds(path)`: whether `path`, every symlink on its way followed, lies under it.
    For paths the trainer or the disk names (a log line, logging.jsonl, an export's target), not request data."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.prefix = os.path.realpath(folder) + os.sep

    def holds(self, path: str | os.PathLike[str]) -> bool:
        try:
            return os.path.realpath(path).startswith(self.prefix)
        except ValueError:  # a NUL in it: no path at all
            return False


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


@lru_cache(maxsize=32)
def _real_roots(roots: tuple[Path, ...]) -> list[Path]:
    # The configured roots, resolved once per process (they are settings, not request data).
    return [Path(os.path.realpath(r)) for r in roots]


def _roots_text(roots: Sequence[Path]) -> str:
    return ", ".join(str(r) for r in roots)


# Called with (field, the text asked for, the resolved path) before anything looks at whether a path inside
# the roots exists: it raises to refuse the path (folder_owners.FolderGuard: another owner's job folder).
Guard = Callable[[str, str, Path], None]


@lru_cache(maxsize=8)
def own_files_guard(own: tuple[tuple[str, Path], ...], roots: tuple[Path, ...]) -> Guard:
    """Refuses the server's own files (`own`: (setting, path)) as anyone's data set or model, and a folder that
    holds them, whatever the roots hold: a data root that holds API_KEYS_FILE let a user train on the key file
    (its names were told by the data set check, its keys would be in the run's log). A root inside one of them
    (`roots`: DATA_DIR=/srv/swift, DATA_ROOTS=/srv/swift/datasets) is the users' all the same."""
    real_roots = [Path(os.path.realpath(r)) for r in roots]
    real = []
    for name, path in own:
        folder = Path(os.path.realpath(path))
        real.append((name, folder, [r for r in real_roots if folder in r.parents]))

    def guard(field: str, value: str, path: Path) -> None:
        for name, folder, users in real:
            if _inside(path, [folder]) and not _inside(path, users):
                raise Invalid(f"{field} '{value}' lies in the server's own files ({name}): name a data set or "
                              "model of your own")  # fmt: skip
            if path in folder.parents:
                raise Invalid(f"{field} '{value}' holds the server's own files ({name}): name a folder of your own "
                              "data or model")  # fmt: skip

    return guard


def all_of(*guards: Guard | None) -> Guard | None:
    """One guard that calls each of `guards` in turn (None when none is given)."""
    given = [g for g in guards if g is not None]
    if len(given) < 2:
        return given[0] if given else None

    def guard(field: str, value: str, real: Path) -> None:
        for g in given:
            g(field, value, real)

    return guard


def resolve(field: str, value: str, roots: Sequence[Path], *, data: bool, base: Path, setting: str,
            guard: Guard | None = None, hub: bool = True) -> Resolved:  # fmt: skip
    """Apply the rules above to one request field (`hub` False: it names a local path, whatever its form).
    Synchronous: it may touch the disk (inside roots only)."""
    check_text(field, value)
    if data and (m := _SAMPLE_RE.search(value)) and int(m.group(1)) == 0:
        # (swift asserts a sample above 0: the job would fail after its wait with a bare AssertionError)
        raise Invalid(f"{field} '{value}' asks for 0 rows (#0): write #N with N of 1 or more to train on N rows, or "
                      "leave #N out for the whole data set")  # fmt: skip
    sample: int | None = None
    text = value
    if data and (m := _SAMPLE_RE.search(text)) and is_local_syntax(text):
        sample, text = int(m.group(1)), text[: m.start()]
    real_roots = _real_roots(tuple(roots))
    outside = (
        f"{field} must be inside {setting} ({_roots_text(real_roots)})"
        + ("" if not hub else " or be a hub id such as AI-ModelScope/alpaca-gpt4-data-en#500" if data else
           " or be a hub id such as Qwen/Qwen2.5-7B-Instruct")
    )  # fmt: skip
    if is_local_syntax(text):
        candidate = Path(os.path.expanduser(text))
        if not candidate.is_absolute():
            candidate = base / candidate
        real = Path(os.path.realpath(candidate))
        if not _inside(real, real_roots) or not _inside_as_written(candidate, roots, real_roots):
            raise Invalid(outside)
        if guard is not None:
            guard(field, value, real)
        if not _exists(real):
            raise Invalid(f"{field} '{value}' does not exist (resolved inside {setting} to {real})")
        _refuse_misread(field, value, real, sample)
        return Resolved(_with_sample(str(real), sample), True, real, sample)
    if hub and is_hub_id(text, data=data):
        _refuse_root_named(field, value, text, roots, real_roots, setting, guard)
        return Resolved(text, False)
    # A path relative to the roots: the first root that holds it wins.
    if m := _SAMPLE_RE.search(text):
        sample, text = (int(m.group(1)), text[: m.start()]) if data else (None, text)
    for root in real_roots:
        if (found := _found_under(root, text, field, value, guard)) is not None:
            _refuse_misread(field, value, found, sample)
            return Resolved(_with_sample(str(found), sample), True, found, sample)
    if not hub:
        raise Invalid(f"{field} '{value}' is not a path that exists under {setting} ({_roots_text(real_roots)})")
    raise Invalid(
        f"{field} '{value}' is neither a hub id (namespace/name) nor a path that exists under {setting} "
        f"({_roots_text(real_roots)}): use a hub id, or a path inside one of those folders"
    )


def _refuse_root_named(field: str, value: str, text: str, roots: Sequence[Path], real_roots: Sequence[Path],
                       setting: str, guard: Guard | None) -> None:  # fmt: skip
    """A hub id whose namespace is a root's folder name and whose name is there (`models/tiny-qwen2` beside
    MODEL_ROOTS=./models, which holds tiny-qwen2): swift downloaded it, and the job failed after its wait with a
    network error (hunt EO). It is looked for as a path relative to that root would be (another owner's folder is
    refused first, whether it exists); one naming nothing there, or a subset (`:name`: only a hub's), is a hub id."""
    namespace, _, rest = text.partition("/")
    if ":" in rest:
        return
    local = _SAMPLE_RE.sub("", rest)
    for root, real_root in zip(roots, real_roots, strict=True):
        if namespace in (Path(root).name, real_root.name) and _found_under(real_root, local, field, value, guard):
            raise Invalid(
                f"{field} '{value}' has the form of a hub id (namespace/name), which swift would download, but "
                f"{setting}'s folder {real_root} holds '{local}': to use that, write '{rest}' (a path relative to "
                f"{setting}) or '{real_root / rest}'. A hub id that names a path in those folders this way cannot "
                "be used here"
            )


def _found_under(root: Path, text: str, field: str, value: str, guard: Guard | None) -> Path | None:
    """`text` as a path relative to the resolved `root`: where it resolves when it lies inside that root (as written
    too) and exists. `guard` is called first, so that another owner's folder is refused whether it exists."""
    real = Path(os.path.realpath(root / text))
    if not _inside(real, [root]) or not _inside_as_written(root / text, [root], [root]):
        return None
    if guard is not None:
        guard(field, value, real)
    return real if _exists(real) else None


def root_names(roots: Sequence[Path]) -> frozenset[str]:
    """The folder names of `roots` as configured and as resolved: a hub id's namespace among them is looked for
    on the disk (`_refuse_root_named`)."""
    return frozenset(name for r in roots for name in (Path(r).name, Path(os.path.realpath(r)).name))


def _inside_as_written(candidate: Path, roots: Sequence[Path], real_roots: Sequence[Path]) -> bool:
    """Inside a root before any symlink is followed too: `<a link outside>/../<into a root>` resolves inside
    only when the link exists and points at the right depth, so accepting it would tell what is outside."""
    lexical = Path(os.path.normpath(candidate))
    return _inside(lexical, real_roots) or _inside(lexical, [Path(os.path.abspath(r)) for r in roots])


def check_folder_links(field: str, folder: Path, roots: Sequence[Path], *, setting: str,
                       guard: Guard | None = None, fix: str = "name the data files instead") -> None:  # fmt: skip
    """A folder named as a data set or a model: swift (a hub loader) reads the files in it, following links, so
    no link in it, or in a folder a link leads to, may lead out of the roots (or, with `guard`, into another
    owner's job folder). Bounded: MAX_FOLDER_ENTRIES entries at most; each folder is read once (no loop)."""
    real_roots = _real_roots(tuple(roots))
    seen = {os.path.realpath(folder)}
    stack = [str(folder)]
    count = 0
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except OSError:
            continue  # unreadable to the server: swift, the same user, cannot read it either
        with entries:
            for entry in entries:
                count += 1
                if count > MAX_FOLDER_ENTRIES:
                    raise Invalid(f"{field}: the folder holds more than {MAX_FOLDER_ENTRIES:,} files and folders: "
                                  "name a folder with fewer")  # fmt: skip
                if not entry.is_symlink():
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    continue
                real = os.path.realpath(entry.path)
                shown = os.path.relpath(entry.path, folder)
                if not _inside(Path(real), real_roots):
                    raise Invalid(f"{field}: '{shown}' in that folder is a link that leads outside {setting}: "
                                  f"swift would read it; {fix}")  # fmt: skip
                if guard is not None:
                    guard(field, shown, Path(real))
                if real not in seen and os.path.isdir(real):
                    seen.add(real)
                    stack.append(entry.path)  # read through the link, so that names say how swift reaches them


def _exists(path: Path) -> bool:
    try:
        os.stat(path)
        return True
    except OSError:  # missing, unreadable folder on the way, a symlink loop: all "not there" to us
        return False


def _with_sample(path: str, sample: int | None) -> str:
    return f"{path}#{sample}" if sample is not None else path


def shadowed_sample(value: str) -> bool:
    """Whether a stored data set `<path>#N` names an existing entry as a whole: ms-swift (DatasetSyntax.parse) reads
    a path that exists as it is before it splits `#N` off, so it would read `x.jsonl#5` (any file, or a link out of
    the roots) instead of the `x.jsonl` that was checked."""
    return without_sample(value) != value and os.path.lexists(value)


def misread(value: str) -> str | None:
    """Why ms-swift's DatasetSyntax.parse would not read the stored local data set `value` (`<path>` or `<path>#N`)
    as the path checked, None when it would. Besides a whole name `x.jsonl#N` beside it (shadowed_sample): a value
    that is not a path as a whole is split at its first `::` (`hf::`/`ms::`, so `<root>/a::/elsewhere/x.jsonl#N`
    read `/elsewhere/x.jsonl`) and at its first `:` (a subset) when what is left does not exist, and what it reads
    is stripped of blanks at its ends (`<root>/set ` read `<root>/set`). Decided from the text and the entries
    inside the roots only (nothing outside them is looked at)."""
    path = without_sample(value)
    if path != path.strip():
        return "it begins or ends with a blank, which ms-swift strips off"
    if "::" in value:
        # (refused without #N too: a file deleted before its run is split so, to a path relative to swift's folder)
        return "it holds '::', where ms-swift splits a hub's name (hf::, ms::) off a data set it does not find as a " \
            "whole, as with #N"  # fmt: skip
    if ":" in path and not os.path.lexists(path):
        return "it holds ':' and is gone, so ms-swift would read the part before the ':' (a subset's syntax)"
    return None


def _refuse_misread(field: str, value: str, real: Path, sample: int | None) -> None:
    if sample is not None and shadowed_sample(_with_sample(str(real), sample)):
        raise Invalid(
            f"{field} '{value}': a file named '{real.name}#{sample}' lies beside '{real.name}', and ms-swift "
            f"would read that one instead of {sample} rows of '{real.name}': rename it, or leave #N out"
        )
    if why := misread(_with_sample(str(real), sample)):
        raise Invalid(f"{field} '{value}': ms-swift would not read the path checked ({why}): rename it")


def resolve_output_dir(requested: str, root: Path) -> Path:
    """Relative paths resolve under OUTPUT_ROOT; nothing (`..`, absolute paths, symlinks) may leave it."""
    check_text("output_dir", requested)
    if requested.startswith("~"):
        # data_path and model_path read '~' as a home folder (and refuse it, outside the roots); here it made a
        # folder named '~' under OUTPUT_ROOT, not what the user meant either.
        raise Invalid(f"output_dir '{requested}' starts with '~': name a folder under OUTPUT_ROOT, such as "
                      f"{requested.lstrip('~/') or 'my_job'}")  # fmt: skip
    configured, root = root, _real_roots((root,))[0]
    candidate = Path(requested)
    candidate = candidate if candidate.is_absolute() else root / candidate
    resolved = Path(os.path.realpath(candidate))
    if resolved == root:
        raise Invalid(f"output_dir '{requested}' is OUTPUT_ROOT itself: name a folder inside it, such as my_job")
    if root not in resolved.parents or not _inside_as_written(candidate, [configured], [root]):
        raise Invalid(
            f"output_dir '{requested}' is outside OUTPUT_ROOT ({root}): use a relative folder such as training_001"
        )
    size = len(str(resolved).encode("utf-8", "surrogatepass"))
    if size > MAX_PATH_BYTES - OUTPUT_RESERVE_BYTES:
        # Every file the run writes there would be a name too long for the system: its start would fail.
        raise Invalid(f"output_dir resolves to a path of {size} bytes: at most {MAX_PATH_BYTES - OUTPUT_RESERVE_BYTES} "
                      "are allowed, to leave room for the files a run writes inside it; shorten it")  # fmt: skip
    return resolved


def is_file(path: Path) -> bool:
    """Something that is not a folder is there, or on the way there (not there yet, or unreadable: no; the
    run's own mkdir says so). Not an answer to give as it is: whose folder it lies in is checked first
    (folder_owners)."""
    try:
        return not stat.S_ISDIR(os.stat(path).st_mode)
    except NotADirectoryError:
        return True  # a file on the way: the run could never make its folder
    except OSError:
        return False


def real_output_root(root: Path) -> Path:
    """OUTPUT_ROOT with its symlinks resolved (once per process), as resolved paths inside it begin."""
    return _real_roots((root,))[0]


def relinked_input(inputs: Iterable[tuple[str, str, bool]], data_roots: Sequence[Path], model_roots: Sequence[Path],
                   owned: Sequence[Path], own: Guard | None = None) -> str | None:  # fmt: skip
    """Why one of a job's local inputs (field, value, whether a data set: its `#N` sample aside), stored resolved
    at its create, now leads elsewhere: out of its roots (DATA_ROOTS for a data set; MODEL_ROOTS and OUTPUT_ROOT
    for a model), or into an `owned` area (OUTPUT_ROOT's job folders, the uploads folders), where whose files they
    are was checked at the create for the path as it was. A link elsewhere inside its roots (data moved to new
    storage, a link left at its old place) is taken, unless it leads into the server's own files (`own`: the
    create's guard; a data root that holds API_KEYS_FILE); so is one no longer inside its roots, which changed.
    None when none leads astray. Blocking: just before a run."""
    real_data, real_models = _real_roots(tuple(data_roots)), _real_roots(tuple(model_roots))
    real_owned = _real_roots(tuple(owned))
    for field, value, data in inputs:
        path = without_sample(value) if data else value
        if not os.path.isabs(path):
            continue  # a hub id
        if data and shadowed_sample(value):
            return (f"{field} {value}: a file of that whole name is there (made since the job was created, or the "
                    f"server that took it did not look), and ms-swift would read it instead of the rows of {path}: "
                    "rename it, and create the job again")  # fmt: skip
        if data and (why := misread(value)):
            return (f"{field} {value}: ms-swift would not read the path checked ({why}): rename it, and create the "
                    "job again")  # fmt: skip
        stored = os.path.normpath(path)
        resolved = Path(os.path.realpath(stored))
        in_roots = _inside(resolved, real_data if data else real_models)
        if str(resolved) == stored and not in_roots:
            # The roots changed since its create (an operator took a data root away: its jobs read it on).
            setting = "DATA_ROOTS" if data else "MODEL_ROOTS or OUTPUT_ROOT"
            return (f"{field} {path} is no longer inside {setting}, which the server's operator changed since the "
                    f"job was created: it runs again once {setting} holds it (resume it then), or create the job "
                    "again with a path inside them")  # fmt: skip
        inside = in_roots and not _own(own, field, path, resolved)
        if str(resolved) == stored or (inside and not _inside(resolved, real_owned)):
            continue
        if inside and _moved_area(Path(stored), resolved, real_owned):
            continue
        return (f"{field} {path} now leads to another place: a symlink on its way was made or changed after the "
                "job was created; remove it, or create the job again")  # fmt: skip
    return None


def _moved_area(stored: Path, resolved: Path, real_owned: Sequence[Path]) -> bool:
    """Whether `stored` is the same path under an owned area that moved, a link left at its old place (whether the
    setting names the old place or the new): an ancestor of it resolves to the area, and the rest of the path is
    as stored (no link inside the area, which could lead into another owner's files)."""
    for root in real_owned:
        if root not in resolved.parents:
            continue
        rest = resolved.relative_to(root)
        ancestor = stored
        for _ in rest.parts:
            ancestor = ancestor.parent
        if ancestor / rest == stored and os.path.realpath(ancestor) == str(root):
            return True
    return False


def relinked_folder(inputs: Iterable[tuple[str, str, bool]], data_roots: Sequence[Path], model_roots: Sequence[Path],
                    guard: Guard | None) -> str | None:  # fmt: skip
    """Why a folder among a job's local inputs (as `relinked_input` takes them) now holds a link its create would
    have refused: out of its roots, or (`guard`, the create's) into another owner's files; made since, the run
    would load what it leads to. A data set folder's card is read again too (`dataset_folders`). None when none
    does. Blocking: just before a run."""
    for field, value, data in inputs:
        path = without_sample(value) if data else value
        if not os.path.isabs(path) or not os.path.isdir(path):
            continue  # a hub id, or a file (relinked_input's)
        try:
            check_folder_links(field, Path(path), data_roots if data else model_roots, guard=guard,
                               setting="DATA_ROOTS" if data else "MODEL_ROOTS or OUTPUT_ROOT")  # fmt: skip
            if data:
                check_data_folder(field, Path(path))
        except Invalid as exc:  # (Unavailable, whose folder a link leads into not read, is raised: not now)
            return f"{field} {path} changed since the job was created: {exc.detail}"
    return None


def _own(guard: Guard | None, field: str, value: str, path: Path) -> bool:
    try:
        if guard is not None:
            guard(field, value, path)
    except Invalid:
        return True
    return False


def escaped_output_root(output_dir: Path, root: Path) -> str | None:
    """Why a job's output folder, as resolved when the job was created, now leads elsewhere (a symlink on its
    way made or changed since: out of OUTPUT_ROOT, or into another job's folder) or out of OUTPUT_ROOT (which
    moved); None while it does not. Checked again just before a run writes there and before its files are read."""
    return output_folder(output_dir, root)[1]


def output_folder(output_dir: Path, root: Path) -> tuple[Path | None, str | None]:
    """(the folder to read, None) while `escaped_output_root` has nothing to say, else (None, why): one
    resolution, so that what was checked is what is read (two let a link swapped in between be read)."""
    real_root = _real_roots((root,))[0]
    try:
        resolved = Path(os.path.realpath(output_dir))
    except OSError:  # a link on its way changed while it was read (readlink: EINVAL): not to be read now
        return None, f"output_dir {output_dir} changed while it was being resolved: a symlink on its way moves"
    why = _escaped(output_dir, resolved, real_root)
    return (None, why) if why else (resolved, None)


def _escaped(output_dir: Path, resolved: Path, real_root: Path) -> str | None:
    if real_root in resolved.parents:
        if resolved == output_dir or real_root not in output_dir.parents:
            return None  # as created; or a record from before OUTPUT_ROOT moved, reached through a link left behind
        # Stored resolved, under the root as it is: a link was made on the way since (one owner's folder made a
        # link to another's took that one's files).
        # (Not naming that folder: it may be another owner's.)
        return (f"output_dir {output_dir} now leads to another folder: a symlink on its way was made or changed "
                "after the job was created; remove it, or create the job again")  # fmt: skip
    return (
        f"output_dir {output_dir} now resolves to {resolved}, outside OUTPUT_ROOT ({real_root}): a symlink on its "
        "way changed after the job was created, or OUTPUT_ROOT moved (a link at its old path to the new one makes "
        "its jobs' folders theirs again); create the job again"
    )
