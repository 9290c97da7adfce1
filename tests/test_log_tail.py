from __future__ import annotations

from pathlib import Path

import pytest

from application.utils.log_tail import last_cr_segment, read_from, tail_lines, tail_start


def reference_tail(data: bytes, n: int) -> list[str]:
    """What tail_lines must return, computed the slow way from the whole file."""
    if data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        return []
    lines = data.split(b"\n")[-n:]
    return [last_cr_segment(raw.decode("utf-8", errors="replace")).rstrip() for raw in lines]


@pytest.fixture
def big_log(tmp_path: Path) -> Path:
    path = tmp_path / "big.log"
    with path.open("wb") as f:
        for i in range(200_000):
            f.write(f"line {i} {'x' * (i % 37)}\n".encode())
    return path


def bytes_read_by_this_process() -> int:
    """The kernel's count of bytes this process has read (/proc/self/io rchar): however the code under test
    reads (open, Path.read_bytes, os.pread, mmap is the exception), it shows here."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_big_file_exact_last_lines_without_reading_it_all(big_log: Path) -> None:
    size = big_log.stat().st_size
    before = bytes_read_by_this_process()
    lines = tail_lines(big_log, 10)
    read = bytes_read_by_this_process() - before
    assert lines == [f"line {i} {'x' * (i % 37)}" for i in range(199_990, 200_000)]
    assert read <= 65536 + 4096, f"read {read} bytes of a {size}-byte file for 10 lines"  # (+ /proc/self/io)


@pytest.mark.parametrize("n", [1, 2, 50, 1000, 5000])
@pytest.mark.parametrize("block_size", [7, 100, 4096, 65536])
def test_big_file_any_block_size(big_log: Path, n: int, block_size: int) -> None:
    lines = tail_lines(big_log, n, block_size=block_size)
    assert len(lines) == n
    assert lines[-1] == f"line 199999 {'x' * (199999 % 37)}"
    assert lines[0] == f"line {200_000 - n} {'x' * ((200_000 - n) % 37)}"


def test_n_larger_than_file(tmp_path: Path) -> None:
    path = tmp_path / "small.log"
    path.write_bytes(b"one\ntwo\nthree\n")
    assert tail_lines(path, 100) == ["one", "two", "three"]
    assert tail_lines(path, 100, block_size=2) == ["one", "two", "three"]


def test_zero_or_negative_n(tmp_path: Path) -> None:
    path = tmp_path / "small.log"
    path.write_bytes(b"one\n")
    assert tail_lines(path, 0) == []
    assert tail_lines(path, -3) == []


def test_missing_and_empty_files(tmp_path: Path) -> None:
    assert tail_lines(tmp_path / "nope.log", 5) == []
    assert tail_lines(tmp_path / "nodir" / "nope.log", 5) == []
    assert tail_lines(tmp_path, 5) == []  # a directory
    empty = tmp_path / "empty.log"
    empty.write_bytes(b"")
    assert tail_lines(empty, 5) == []
    newline_only = tmp_path / "nl.log"
    newline_only.write_bytes(b"\n")
    assert tail_lines(newline_only, 5) == [""]


def test_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "partial.log"
    path.write_bytes(b"a\nb\nTrain:  5%|  | 1/20")
    assert tail_lines(path, 2) == ["b", "Train:  5%|  | 1/20"]


def test_carriage_returns_keep_what_tqdm_left_on_screen(tmp_path: Path) -> None:
    path = tmp_path / "tqdm.log"
    path.write_bytes(
        b"start\n"
        b"\rTrain:   5%|5 | 1/20\rTrain:  10%|1 | 2/20\r          \r\rTrain:  15%|1 | 3/20\n"
        b"\rVal: 100%|##| 10/10\r     \r\n"
        b"windows line\r\n"
        b"\rTrain:  20%|2 | 4/20\rTrain:  25%|2 | 5/20"
    )
    assert tail_lines(path, 10) == [
        "start",
        "Train:  15%|1 | 3/20",
        "Val: 100%|##| 10/10",
        "windows line",
        "Train:  25%|2 | 5/20",
    ]


def test_real_swift_stderr_tail(tmp_path: Path) -> None:
    fixture = Path(__file__).parent / "fixtures" / "swift" / "sigterm_to_launcher_only.stderr_tail.txt"
    lines = tail_lines(fixture, 3)
    assert lines[-1] == "Train:  39%|███▊      | 1158/3000 [00:25<00:38, 48.26it/s]"
    assert "\r" not in "".join(lines)


def test_block_boundaries_match_reference(tmp_path: Path) -> None:
    data = (
        "α line one\nβ two\r\r\n\nthree ███ bar\rfour\n∑ five has \u00e9 and \U0001f600\nsix\r   \r\nseven"
    ).encode() + b"\n\xff\xfe bad bytes \xe2\x96\n"
    path = tmp_path / "mixed.log"
    path.write_bytes(data)
    for block_size in range(1, 40):
        for n in range(1, 12):
            assert tail_lines(path, n, block_size=block_size) == reference_tail(data, n), (block_size, n)
    assert "\ufffd" in tail_lines(path, 1)[0]


def test_max_bytes_bounds_a_file_without_newlines(tmp_path: Path) -> None:
    path = tmp_path / "one-line.log"
    path.write_bytes(b"\rTrain: x" * 100_000 + b"\rTrain: last")
    assert tail_lines(path, 5, block_size=1000, max_bytes=5000) == ["Train: last"]


def test_bad_block_size(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    path.write_bytes(b"a\n")
    with pytest.raises(ValueError):
        tail_lines(path, 1, block_size=0)


def test_read_from_follows_a_growing_file(tmp_path: Path) -> None:
    path = tmp_path / "grow.log"
    assert read_from(path, 0, 100) == (b"", 0)
    path.write_bytes(b"hello ")
    data, offset = read_from(path, 0, 100)
    assert (data, offset) == (b"hello ", 6)
    assert read_from(path, offset, 100) == (b"", 6)
    with path.open("ab") as f:
        f.write(b"world\nmore")
    data, offset = read_from(path, offset, 3)
    assert (data, offset) == (b"wor", 9)
    data, offset = read_from(path, offset, 100)
    assert (data, offset) == (b"ld\nmore", 16)
    assert read_from(path, offset, 0) == (b"", 16)


def test_read_from_a_truncated_file_starts_again(tmp_path: Path) -> None:
    path = tmp_path / "trunc.log"
    path.write_bytes(b"0123456789")
    path.write_bytes(b"new")
    assert read_from(path, 10, 100) == (b"new", 3)
    with pytest.raises(ValueError):
        read_from(path, -1, 10)


@pytest.mark.parametrize("block_size", [1, 3, 64, 65536])
@pytest.mark.parametrize("final_newline", [True, False])
def test_where_the_last_n_lines_start(tmp_path: Path, block_size: int, final_newline: bool) -> None:
    lines = [f"line {i} " + "x" * (i % 7) for i in range(200)]
    path = tmp_path / "run.log"
    path.write_bytes(("\n".join(lines) + ("\n" if final_newline else "")).encode())
    data = path.read_bytes()
    for n in (1, 2, 17, 199, 200):
        start = tail_start(path, n, block_size=block_size)
        assert data[start:].decode().splitlines() == lines[-n:], (n, start)
    assert tail_start(path, 500, block_size=block_size) == 0
    assert tail_start(path, 0, block_size=block_size) == len(data)  # none: from the end
    assert tail_start(tmp_path / "missing.log", 5) == 0


def test_the_last_lines_start_within_the_bytes_it_may_read(tmp_path: Path) -> None:
    path = tmp_path / "bar.log"
    path.write_bytes(b"x" * 1000 + b"\n" + b"y" * 50 + b"\n")
    assert tail_start(path, 2, block_size=16, max_bytes=100) == 1001  # the longer line starts before them
    path.write_bytes(b"z" * 1000)  # no newline at all within reach: only what comes next
    assert tail_start(path, 3, block_size=16, max_bytes=100) == 1000
