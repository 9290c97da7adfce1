"""The server's own log files (utils/logger.py): rotation, and a disk that refuses writes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_a_log_file_the_disk_refuses_costs_one_line_not_a_traceback_per_record(tmp_path: Path) -> None:
    # A full LOG_DIR: every record printed loguru's "--- Logging error in Loguru Handler ---" and a traceback of
    # ~2 KB to stderr (under Docker, the same full disk); the server served on, its stderr flooded.
    blocked = tmp_path / "logs" / "swift-api.log"
    blocked.parent.mkdir()
    blocked.symlink_to("/dev/full")  # (every write fails with "No space left on device")
    code = ("from pathlib import Path; from loguru import logger; from application.utils.logger import setup_logging; "
            f"setup_logging('INFO', Path({str(blocked.parent)!r}))\n"
            "for n in range(50): logger.info('record {}', n)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=True)  # fmt: skip
    lines = out.stderr.splitlines()
    assert "Traceback" not in out.stderr and "Logging error" not in out.stderr, out.stderr[:2000]
    refused = [line for line in lines if line.startswith("swift-api: cannot write")]
    assert len(refused) == 1 and str(blocked) in refused[0] and "dropped until it can" in refused[0], lines
    assert sum(bool(re.search(r"\| record \d+$", line)) for line in lines) == 50  # the console still has each


def test_a_log_file_is_rotated_past_its_size_keeping_the_newest_few(tmp_path: Path) -> None:
    from application.utils.logger import LogFile

    sink = LogFile(tmp_path / "scheduler.log", rotation="1 KB", retention=3)
    for n in range(100):
        sink.write(f"line {n:03d} " + "x" * 90 + "\n")
    sink.stop()
    files = sorted(tmp_path.iterdir())
    assert (tmp_path / "scheduler.log") in files and len(files) == 4, files  # the current one and 3 old ones
    assert "line 099" in (tmp_path / "scheduler.log").read_text()


def test_a_record_that_meets_another_workers_rotation_is_written_not_dropped(tmp_path: Path) -> None:
    # API workers share one file: a worker rotating it renamed it away as this one rotated too, whose rename then
    # found no file, and the record was dropped with "cannot write ... No such file or directory" (hunt AP).
    from application.utils.logger import LogFile

    path = tmp_path / "swift-api.log"
    sink = LogFile(path, rotation="1 KB", retention=10)
    sink.write("first " + "x" * 900 + "\n")
    path.rename(tmp_path / "swift-api.rotated-by-another-worker.log")  # (what the other worker's rotation does)
    sink.write("second, past the size " + "y" * 200 + "\n")
    sink.write("third\n")
    sink.stop()
    assert "second, past the size" in path.read_text() and "third" in path.read_text()


def test_workers_sharing_a_log_file_go_on_writing_into_the_current_one_after_a_rotation(tmp_path: Path) -> None:
    # After one worker rotated the file, another kept writing into the renamed one, then renamed the first one's
    # new file as it rotated in turn: swift-api.log held one worker's lines, the rest went to old files (review AT).
    from application.utils.logger import LogFile

    path = tmp_path / "swift-api.log"
    a, b = LogFile(path, rotation="1 KB", retention=100), LogFile(path, rotation="1 KB", retention=100)
    for n in range(30):
        a.write(f"a {n:02d} " + "x" * 90 + "\n")
        b.write(f"b {n:02d} " + "y" * 90 + "\n")
    a.stop()
    b.stop()
    current = path.read_text()
    assert "a 29 " in current and "b 29 " in current, current
    every = "".join(p.read_text() for p in tmp_path.iterdir())
    assert all(f"a {n:02d} " in every and f"b {n:02d} " in every for n in range(30))  # (and none lost)


def test_every_log_line_says_its_utc_offset(tmp_path: Path) -> None:
    # Two hosts with another TZ interleaved lines hours apart in one log with nothing to tell them apart (hunt).
    code = ("from pathlib import Path; from loguru import logger; from application.utils.logger import setup_logging; "
            f"setup_logging('INFO', Path({str(tmp_path)!r}))\n"
            "logger.info('hello')")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=True, env={"PATH": "/usr/bin:/bin", "TZ": "Asia/Shanghai"})  # fmt: skip
    stamp = r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{3} \+08:00 \| INFO"
    assert re.match(stamp, out.stderr), out.stderr
    assert re.match(stamp, (tmp_path / "swift-api.log").read_text()), (tmp_path / "swift-api.log").read_text()


def test_a_logged_traceback_shows_no_frames_variables(tmp_path: Path) -> None:
    # loguru's `diagnose` printed each frame's variables: a failed webhook's URLs with their tokens (hunt BM).
    code = ("from pathlib import Path; from loguru import logger; from application.utils.logger import setup_logging; "
            f"setup_logging('INFO', Path({str(tmp_path)!r}))\n"
            "def deliver(url):\n"
            "    raise OSError('refused')\n"
            "target = 'https://hooks.example/T0K3N-s3cr3t'\n"
            "try:\n"
            "    deliver(target)\n"
            "except OSError:\n"
            "    logger.exception('webhook delivery failed')\n")  # fmt: skip
    script = tmp_path / "deliver.py"  # (from a file: a frame's variables are shown beside its source lines)
    script.write_text(code.replace("'https://hooks.example/T0K3N-s3cr3t'", "'https://hooks.example/' + 'T0K3N' * 2"))
    out = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})  # fmt: skip
    written = (tmp_path / "swift-api.log").read_text()
    for text in (out.stderr, written):
        assert "webhook delivery failed" in text and "OSError: refused" in text, text
        assert "T0K3NT0K3N" not in text, text


def test_a_message_cannot_start_a_line_of_its_own(tmp_path: Path) -> None:
    # A client's X-Forwarded-For reached uvicorn's access line as it came: a NEL (a line break to Python's
    # splitlines), CR/LF or ESC in it forged a line of the log's own shape (hunt ED). Tracebacks keep their lines.
    code = ("import logging; from pathlib import Path; from loguru import logger; "
            "from application.utils.logger import setup_logging; "
            f"setup_logging('INFO', Path({str(tmp_path)!r}))\n"
            "logging.getLogger('uvicorn.access').info('%s - %s', '10.0.0.1\\x852026 | INFO | 6.6.6.6', 'GET /')\n"
            "logger.info('a {}', 'x\\r\\nFORGED \\x1b[2J\\u2028\\x9b\\ttab')\n"
            "try:\n    1 / 0\nexcept ZeroDivisionError:\n    logger.exception('boom')\n")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=60, check=True)
    text = (tmp_path / "swift-api.log").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert r"10.0.0.1\x852026 | INFO | 6.6.6.6 - GET /" in lines[0], lines
    assert lines[1].endswith("- a x\\r\\nFORGED \\x1b[2J\\u2028\\x9b\ttab"), lines
    assert lines[2].endswith("- boom") and lines[3].startswith("Traceback") and "ZeroDivisionError" in text, lines
    assert len(lines) > 4
