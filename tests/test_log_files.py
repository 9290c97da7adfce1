"""A job's logs are written and read only in its own folder: links its owner plants there lead nowhere."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from application.utils.log_files import open_in_place
from tests.conftest import job_body, make_model, wait_job


def test_an_exports_rerun_mark_and_exit_record_are_not_taken_through_a_link(tmp_path: Path) -> None:
    # The line that marks an export run again was appended through a link planted as its log, before its spawn
    # refused the link; an exit record planted as a link decided how a run ended.
    from application.services import process_group as pg
    from application.services.export_run import rerun_mark

    victim = tmp_path / "victim.txt"
    victim.write_text("the server's own file\n")
    (tmp_path / "j.export.log").symlink_to(victim)
    with pytest.raises(OSError) as exc:
        rerun_mark(tmp_path / "j.export.log")
    assert exc.value.errno == 40 and victim.read_text() == "the server's own file\n"
    (tmp_path / "record.json").write_text('{"exit_code": 0, "finished_at": 1.0}')
    (tmp_path / "j.exit.json").symlink_to(tmp_path / "record.json")
    assert pg.read_exit(tmp_path / "j.exit.json") == (None, None)
    assert pg.read_exit(tmp_path / "record.json") == (0, 1.0)


def test_a_link_as_the_file_or_on_the_way_to_its_folder_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "secret").write_text("secret\n")
    (real / "log").symlink_to(tmp_path / "secret")
    (real / "dangling").symlink_to(tmp_path / "made-by-a-write")
    (tmp_path / "linked").symlink_to(real, target_is_directory=True)
    cases = ((real / "log", "r"), (real / "log", "a"), (real / "dangling", "w"), (tmp_path / "linked" / "x", "w"))
    for path, mode in cases:
        with pytest.raises(OSError) as exc:
            open_in_place(path, mode)  # type: ignore[arg-type]
        assert exc.value.errno == 40, (path, mode)
    assert not (tmp_path / "made-by-a-write").exists() and (tmp_path / "secret").read_text() == "secret\n"
    with open_in_place(real / "plain", "a") as f:
        f.write(b"ok\n")
    with open_in_place(real / "plain") as f:
        assert f.read() == b"ok\n"


def test_a_folder_stored_before_output_root_moved_is_reached_through_the_link_left_at_its_old_place_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from application.utils import log_files

    monkeypatch.setattr(log_files, "_ROOTS", [])
    new = tmp_path / "output-new"
    (new / "job" / "logs").mkdir(parents=True)
    (new / "job" / "logs" / "run.log").write_bytes(b"step 1\n")
    (new / "bob" / "logs").mkdir(parents=True)
    (new / "bob" / "logs" / "run.log").write_bytes(b"bob's\n")
    (tmp_path / "output").symlink_to(new)  # the README's move
    stored = tmp_path / "output" / "job" / "logs" / "run.log"
    with pytest.raises(OSError, match="a symbolic link leads to its folder"):
        open_in_place(stored)  # (no OUTPUT_ROOT told)
    for configured in (new, tmp_path / "output"):  # the new settings, or a runner's from before the move
        log_files.allow_moved_root(configured)
        with open_in_place(stored) as f:
            assert f.read() == b"step 1\n"
    # A link inside the root is an owner's: through one to the root itself, a folder stored under the root leads
    # into another owner's (alice's job folder made a link after its create).
    (new / "alice").mkdir()
    (new / "alice" / "x").symlink_to(new)
    with pytest.raises(OSError, match="a symbolic link leads to its folder"):
        open_in_place(new / "alice" / "x" / "bob" / "logs" / "run.log")


def test_a_fifo_in_a_logs_place_is_refused_at_once_not_waited_on(tmp_path: Path) -> None:
    # Opened for reading, a FIFO made in a log's place held GET .../logs for ever (in a worker thread: a few such
    # requests took every thread an API worker has).
    from application.utils.log_tail import tail_lines

    fifo = tmp_path / "j.train.log"
    os.mkfifo(fifo)
    for mode in ("r", "a", "w"):
        with pytest.raises(OSError) as exc:
            open_in_place(fifo, mode)
        assert exc.value.errno in (40, 6), (mode, exc.value)  # (ELOOP; ENXIO: a FIFO with no reader, for a write)
    assert tail_lines(fifo, 10, in_place=True) == []


async def test_a_jobs_logs_are_never_written_or_read_through_a_link_its_owner_planted(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    # With a link in a job's folder (shared storage), a run appended its runner's lines to any file the server
    # could write, created swift's log wherever a dangling link led, wrote every log of a run into another owner's
    # folder through a linked logs/, and GET .../logs (and the stream) served /etc/passwd as a log.
    make_model(tmp_path / "models" / "tiny-qwen2")
    victim = tmp_path / "victim.txt"
    victim.write_text("the server's own file\n")
    async with app_factory() as client:
        body = job_body(tmp_path, "done", auto_start=True, training={"max_steps": 2})
        assert (await client.post("/jobs", json=body)).status_code == 201
        done = await wait_job(client, "done", lambda j: j["status"] == "completed")
        log = Path(done["log_file"])
        log.unlink()
        log.symlink_to(victim)
        assert (await client.get("/jobs/done/logs")).json()["lines"] == []
        stream = await client.get("/jobs/done/logs/stream")
        assert "server's own file" not in stream.text and "event: end" in stream.text, stream.text

        # A linked logs/ folder: the run does not start, and nothing is written where it leads.
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        out = tmp_path / "output" / "linked"
        out.mkdir(parents=True)
        (out / "logs").symlink_to(elsewhere, target_is_directory=True)
        body = job_body(tmp_path, "linked", auto_start=True, training={"max_steps": 2})
        assert (await client.post("/jobs", json=body)).status_code == 201
        failed = await wait_job(client, "linked", lambda j: j["status"] == "failed")
        assert "logs folder" in failed["error_message"] and "symbolic link" in failed["error_message"], failed
        assert failed["attempts"][-1]["outcome"] == "failed" and failed["attempts"][-1]["finished_at"], failed
        assert list(elsewhere.iterdir()) == []

        # Links planted as the next run's log names: skipped (a dangling one) or refused (the runner's log).
        out = tmp_path / "output" / "planted"
        (out / "logs").mkdir(parents=True)
        (out / "logs" / "planted.train.log").symlink_to(tmp_path / "created-by-the-run.txt")
        (out / "logs" / "planted.runner.log").symlink_to(victim)
        body = job_body(tmp_path, "planted", auto_start=True, training={"max_steps": 2})
        assert (await client.post("/jobs", json=body)).status_code == 201
        planted = await wait_job(client, "planted", lambda j: j["status"] in ("failed", "completed"))
        assert planted["status"] == "failed" and "runner could not be started" in planted["error_message"], planted
        # Its attempt ends with it (left open, the job's page showed it running beside a failed job).
        ended = planted["attempts"][-1]
        assert (ended["outcome"], ended["error_code"]) == ("failed", "launch") and ended["finished_at"], ended
        assert victim.read_text() == "the server's own file\n" and not (tmp_path / "created-by-the-run.txt").exists()
        assert planted["log_file"] == str(out / "logs" / "planted.train.2.log"), planted["log_file"]
        assert os.path.islink(out / "logs" / "planted.train.log")
