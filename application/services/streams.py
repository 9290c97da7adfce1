"""Server-Sent Events: a job's log, events and progress as they happen (`text/event-stream`).

Each stream is an async generator that polls what the runner writes (the log file, the job's event stream
and loss history in Redis) and yields SSE messages whose `id:` lets a client resume after a reconnect
(`Last-Event-ID`): the log's byte offset after the line, the Redis event id, the run and step of the progress
point. Every poll reads a bounded amount (LOG_CHUNK bytes, EVENTS_BATCH events, HISTORY_TAIL points), so a
stream holds little memory whatever the job wrote; file reads run in a thread, so no stream blocks the event
loop.
A comment line every heartbeat keeps proxies from closing an idle stream; `event: status` says the job's status
when the stream first looks and at each change (a pause, a preemption), `event: end` that the job is over.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from application.models.training_model import JobStatus
from application.services.job_log import dropped_note, event_order
from application.services.job_store import JobStore
from application.services.owner_slots import OwnerSlots
from application.services.point_ids import (
    BEFORE_ANY,
    Key,
    could_have_sent,
    format_id,
    keys_of,
    parse_id,
    rewind_to,
    run_starts,
)
from application.utils.log_files import open_in_place, size_in_place
from application.utils.log_tail import last_cr_segment, read_from, tail_start

LOG_CHUNK = 64 * 1024
# A line longer than this is sent in pieces (a runaway progress bar must not grow a stream's buffer).
MAX_LINE = 16 * 1024
LINES_PER_SEND = 500
NEWLINE = ord("\n")
EVENTS_BATCH = 100
_EVENT_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
# Each part of a Redis stream id is an unsigned 64-bit number: XRANGE refuses a larger one.
_EVENT_ID_PART_MAX = 2**64 - 1
# ASCII digits only: str.isdigit() takes '²', which int() refuses.
_NUMBER = re.compile(r"[0-9]{1,18}")
_EXPORT_LOG_ID = re.compile(r"([0-9a-f]{8})-([0-9]{1,18})")


def _log_tag(path: str | None) -> str:
    """Which export log an id is in: each export writes a log of its own whose offsets start at 0, so an offset
    alone from an earlier export resumed a later one part-way in (its first lines never sent)."""
    return hashlib.sha256((path or "").encode()).hexdigest()[:8]


HISTORY_TAIL = 200
# The job's status is read every few polls: it only decides when the stream ends.
STATUS_EVERY = 2.0
# A stream with nothing new for a while looks less often (never less than this), so idle streams cost little.
IDLE_POLL = 1.0
IDLE_AFTER = 4


class ServerStopping(Exception):
    """Raised in a stream at its next poll once its server has begun to stop (`end_streams`)."""


_stopping = False


def end_streams() -> None:
    """This process's HTTP server begins to stop: each open stream ends at its next poll, whole and without
    `event: end`, so its client reconnects with its Last-Event-ID (to another worker, or to this server once it is
    back) and misses nothing. A stream follows its run to the end: left open, it held every stop for the whole
    grace, and was then cut with a traceback."""
    global _stopping
    _stopping = True


def message(data: str, *, event_id: str | None = None, event: str | None = None) -> str:
    head = (f"id: {event_id}\n" if event_id is not None else "") + (f"event: {event}\n" if event else "")
    return head + "".join(f"data: {line}\n" for line in data.split("\n")) + "\n"


def _piece(buf: bytes) -> int:
    """How much of `buf` (no newline in its first MAX_LINE + 1 bytes) the next message takes: MAX_LINE bytes, fewer
    when that would split a UTF-8 character (a piece decoded alone would show it as U+FFFD)."""
    n = MAX_LINE
    while n > MAX_LINE - 3 and buf[n] & 0xC0 == 0x80:  # a continuation byte starts the rest: move back
        n -= 1
    return n if buf[n] & 0xC0 != 0x80 else MAX_LINE  # (not UTF-8 there: cut where it falls)


def message_end(path: Path, offset: int) -> bool:
    """Could `offset` end a message this log's stream sent (so be an id it sent)? At the start or end of the log,
    after a newline, or inside a line longer than a piece, where it does not split a character (pieces of a long
    line end where the reads happened to end, so they cannot be told exactly). Blocking."""
    try:
        with open_in_place(path) as fh:
            size = os.fstat(fh.fileno()).st_size
            if offset == 0 or offset >= size:
                return offset in (0, size)
            start = max(0, offset - MAX_LINE)
            fh.seek(start)
            around = fh.read(offset - start + 1)
    except OSError:
        return False
    before, after = around[:-1], around[-1]
    line = len(before) - (before.rfind(b"\n") + 1)  # how much of its line lies before it (in the window)
    if line == 0:
        return True
    # A piece of a long line is MAX_LINE - 3 bytes or more (`_piece`), and splits no character; where the bytes
    # are not UTF-8 (a continuation byte after three more), it is cut where it falls.
    continued = after & 0xC0 == 0x80
    return line >= MAX_LINE - 3 and (not continued or all(b & 0xC0 == 0x80 for b in before[-3:]))


def _visible(raw: bytes) -> str:
    """What a terminal would show of one log line: its last carriage-return segment with any text (tqdm redraws,
    and clears its bar with blanks), as GET .../logs shows it."""
    return last_cr_segment(raw.decode("utf-8", errors="replace").rstrip("\r"))


def _piece_visible(raw: bytes) -> str:
    """What to show of a piece of a long line, which ends where the reads fell, often inside a redraw: its last
    whole redraw (the text before its last carriage return), not the start of one ("Train:  63%": hunt CJ). A
    piece with fewer than two carriage returns holds no whole redraw: shown as it is."""
    last = raw.rfind(b"\r")
    if last > 0 and raw.rfind(b"\r", 0, last) >= 0 and (shown := _visible(raw[:last])).strip():
        return shown
    return _visible(raw)


class _Pace:
    """When a stream polls, checks the job's status and sends a heartbeat: the sleeping happens here."""

    def __init__(self, poll: float, heartbeat: float) -> None:
        self.poll = poll
        self.heartbeat = heartbeat
        self.last_status = 0.0
        self.last_sent = time.monotonic()
        self.idle = 0
        # Right after sending, the next poll looks at the status: a stream that has caught up with a job that
        # already ended (a finished job's log, a reconnect) ends at once, not a status period later.
        self.sent = False

    def tick(self) -> tuple[bool, bool]:
        """(check the status now, a heartbeat is due now)."""
        now = time.monotonic()
        check = self.sent or now - self.last_status >= STATUS_EVERY
        if check:
            self.last_status = now
            self.sent = False
        beat = now - self.last_sent >= self.heartbeat
        if beat:
            self.last_sent = now
        return check, beat

    async def sleep(self, busy: bool, behind: bool = False) -> None:
        """`behind`: more is waiting to be read now, so the next read comes at once (after the other tasks')."""
        if _stopping:
            raise ServerStopping
        self.idle = 0 if busy else self.idle + 1
        self.sent = self.sent or busy
        if behind:
            await asyncio.sleep(0)
            return
        await asyncio.sleep(self.poll if self.idle < IDLE_AFTER else max(self.poll, IDLE_POLL))
        if _stopping:
            raise ServerStopping


class Streams:
    def __init__(self, store: JobStore, slots: OwnerSlots, *, poll: float, heartbeat: float) -> None:
        self.store = store
        self.slots = slots  # STREAMS_PER_OWNER
        self.poll = poll
        self.heartbeat = heartbeat

    async def _ended(self, job_id: str, kind: str, created: float) -> tuple[bool, str]:
        """(over, status) for the stream: a job in a terminal state, or an export no longer running; or the job
        is gone (deleted, or its id taken by a new job since: `created`, the creation time of the one it was
        opened on)."""
        status_raw, export_raw, created_raw = (await self.store.get_fields([job_id], ["status", "export",
                                                                                       "created_at"]))[0]  # fmt: skip
        if status_raw is None or not _same(created_raw, created):
            return True, "deleted"
        status = JobStatus(json.loads(status_raw))
        if kind == "export":
            export_status = (json.loads(export_raw) or {}).get("status") if export_raw else None
            return export_status != "running", str(export_status)
        return status.is_terminal(), status.value

    async def logs(self, job_id: str, kind: str, last_id: str | None, created: float,
                   tail: int | None = None) -> AsyncIterator[str]:  # fmt: skip
        """The log, a line per message, `id:` the byte offset after it; from `last_id` on a reconnect.

        A job run again (resumed, retried) writes a new log per run: offsets count on across them (a run's log
        starts where the one before ended), so an id says which run's log it is in. A new stream starts with
        the current run's log (its last `tail` lines, when given); each log is read to its end before the next
        one's."""
        runs = await self._run_logs(job_id, kind, created) or []
        if kind == "export" and last_id:
            # `<log tag>-<offset>`: another export's id (or one without its tag) starts this export's log over.
            found = _EXPORT_LOG_ID.fullmatch(last_id)
            last_id = found.group(2) if found and runs and found.group(1) == _log_tag(runs[-1]) else "0"
        wanted = int(last_id) if last_id and _NUMBER.fullmatch(last_id) else None
        # base: where the log being read starts in the job's offsets; `ahead`: the logs of later runs.
        base, ahead = 0, list(runs)
        # One stat per earlier run (a job paused and resumed many times has many): in a thread, at once.
        sizes = (
            await asyncio.to_thread(lambda: [size_in_place(done) or 0 for done in runs[:-1]]) if len(runs) > 1 else []
        )
        if wanted is not None:
            for length in sizes:
                if wanted < base + length:
                    break
                base += length
                ahead.pop(0)
            if not ahead or not await asyncio.to_thread(message_end, Path(ahead[0]), wanted - base):
                wanted = None  # not an id this stream sent: as a new stream
        if wanted is None:
            base = sum(sizes)
            ahead = runs[-1:]
        path = ahead.pop(0) if ahead else None
        offset = max(0, wanted - base) if wanted is not None else 0
        if wanted is None and tail is not None and path:
            offset = await asyncio.to_thread(tail_start, path, tail, in_place=True)
        partial = b""
        pace = _Pace(self.poll, self.heartbeat)
        status_sent: str | None = None  # the status last sent (`event: status`)
        status_due = ""  # its message, until the log read so far is sent

        def at(n: int) -> str:
            return f"{_log_tag(path)}-{n}" if kind == "export" else str(n)

        while True:
            check, beat = pace.tick()
            if check:
                # A new run writes a new log (.../logs?attempt=N): every one after this, even a run that
                # started and ended since the last look.
                listed, now = await self._logs_and_status(job_id, kind, created)
                runs = listed or []
                later = runs[runs.index(path) + 1 :] if path in runs else runs
                ahead += [log for log in later if log != path and log not in ahead]
                if kind == "train" and now is not None and now != status_sent and not JobStatus(now).is_terminal():
                    status_sent = now  # (a busy log's status too: one that runs again after a pause)
                    # Said once every log before the newest is sent: a rest once the newest is read as far as it
                    # goes, after the lines of the run that ended; a run before its own lines (review ER: "paused",
                    # then the lines of the run it ended; review EU: then those of a later run, on a reconnect).
                    status_due = status_message(now)
            size = size_in_place(path) if path else None
            if ahead and size in (None, offset):
                if partial:  # this log's last line, which no newline will end now
                    yield message(_visible(partial), event_id=at(base + offset))
                # An export's logs are one log each (a rerun appends to its own): its ids start again.
                base = 0 if kind == "export" else base + offset
                offset, partial, path = 0, b"", ahead.pop(0)
                size = size_in_place(path)
                if status_due and not ahead and status_sent == JobStatus.RUNNING:
                    yield status_due  # before the lines of the run it says runs (those of earlier ones are sent)
                    status_due = ""
            data = b""
            if path and size != offset:
                data, end = await asyncio.to_thread(read_from, Path(path), offset, LOG_CHUNK, in_place=True)
                if data and end - len(data) < offset:
                    partial = b""  # the file was replaced: read again from its start
                offset = end
            sent = False
            buf = partial + data
            start = base + offset - len(buf)
            # By index, not by cutting the rest off each line (quadratic in the lines of a chunk), and sent in
            # batches, the loop given back between them: a chunk of empty lines is 65,536 messages, and a send
            # seldom lets other requests run (one such log stalled a worker's /health for seconds).
            pos, batch = 0, []
            while True:
                cut = buf.find(b"\n", pos)
                # (its newline read with it or not: a line longer than a piece went whole when it was)
                if (cut < 0 and len(buf) - pos > MAX_LINE) or cut - pos > MAX_LINE:
                    cut = pos + _piece(buf[pos : pos + MAX_LINE + 1]) - 1
                if cut < 0:
                    break
                start += cut + 1 - pos
                if buf[cut] == NEWLINE:
                    shown = _visible(buf[pos:cut])
                else:  # a piece of a long line
                    shown = _piece_visible(buf[pos : cut + 1])
                batch.append(message(shown, event_id=at(start)))
                pos = cut + 1
                if len(batch) == LINES_PER_SEND:
                    yield "".join(batch)
                    batch, sent = [], True
                    await asyncio.sleep(0)
            if batch:
                yield "".join(batch)
                sent = True
            partial = buf[pos:]
            if status_due and not ahead and len(data) < LOG_CHUNK:  # (the newest log, read as far as it goes)
                if partial and status_sent != JobStatus.RUNNING:  # its run has ended: no newline will end its last line
                    yield message(_visible(partial), event_id=at(base + offset))
                    partial = b""
                yield status_due
                status_due = ""
            if not (sent or len(data) == LOG_CHUNK):
                if check:
                    over, status = await self._ended(job_id, kind, created)
                    # Over, but with what was written before the end still unread (the status was read after
                    # the log): one more round.
                    if over and (ahead or (path and size_in_place(path) not in (None, offset))):
                        over = False
                        pace.sent = True
                    if over:
                        if partial:
                            yield message(_visible(partial), event_id=at(base + offset))
                        yield message(json.dumps({"status": status}), event="end")
                        return
                if beat:
                    yield ": keep-alive\n\n"
            # A full chunk: the log has more now (a long log caught up with, a chatty run), read at once.
            await pace.sleep(sent, behind=len(data) == LOG_CHUNK)

    async def _run_logs(self, job_id: str, kind: str, created: float) -> list[str] | None:
        """The logs of the job's runs, oldest first, the current one last (an export has one: the current);
        None once the id is another job's."""
        return (await self._logs_and_status(job_id, kind, created))[0]

    async def _logs_and_status(self, job_id: str, kind: str, created: float) -> tuple[list[str] | None, str | None]:
        """`_run_logs`, and the job's status in the same read."""
        fields = await self.store.get_fields([job_id], ["log_file", "export", "attempts", "created_at", "status"])
        log_raw, export_raw, attempts_raw, created_raw, status_raw = fields[0]
        if not _same(created_raw, created):
            return None, None
        return self._logs_of(kind, log_raw, export_raw, attempts_raw), json.loads(status_raw) if status_raw else None

    @staticmethod
    def _logs_of(kind: str, log_raw: str | None, export_raw: str | None, attempts_raw: str | None) -> list[str]:
        if kind == "export":
            current = (json.loads(export_raw) or {}).get("log_file") if export_raw else None
            return [current] if current else []
        logs = [a["log_file"] for a in (json.loads(attempts_raw) or [] if attempts_raw else []) if a.get("log_file")]
        current = json.loads(log_raw) if log_raw else None
        return list(dict.fromkeys([*logs, *([current] if current else [])]))

    async def events(self, job_id: str, last_id: str | None, created: float) -> AsyncIterator[str]:
        """The job's events, `id:` the event id (the same ids as GET .../events)."""
        # Only an id of the form Redis gave (ms-seq) is used: anything else would make XRANGE fail.
        after = _event_id(last_id)
        # Events are only ever added after the newest: an id past it is not one this stream sent (a stale id of
        # another Redis, a hand-made one). It would skip every event up to it, so the stream starts over instead.
        newest = await self.store.newest_event_id(job_id) if after else None
        if after and (newest is None or event_order(after) > event_order(newest)):
            after = None
        if oldest := await self.store.events_dropped(job_id, after):
            # Without it a client resuming (or starting) past a trimmed part could not tell the gap.
            yield message(json.dumps({"oldest": oldest, "message": dropped_note(oldest)}), event="dropped")
        pace = _Pace(self.poll, self.heartbeat)
        while True:
            check, beat = pace.tick()
            batch = await self.store.events(job_id, after, EVENTS_BATCH)
            if batch and not await self._same(job_id, created):
                batch = []  # the id is another job's now: the next status check ends the stream
                pace.sent = True
            if batch:
                after = batch[-1].id
                yield "".join(message(ev.model_dump_json(), event_id=ev.id) for ev in batch)
            if not batch:
                if check:
                    over, status = await self._ended(job_id, "train", created)
                    # The end's own event is written with the status: read after it, nothing is missed.
                    if over and (status == "deleted" or not await self.store.events(job_id, after, 1)):
                        yield message(json.dumps({"status": status}), event="end")
                        return
                    pace.sent = pace.sent or over
                if beat:
                    yield ": keep-alive\n\n"
            await pace.sleep(bool(batch))

    async def progress(self, job_id: str, last_id: str | None, created: float) -> AsyncIterator[str]:
        """One message per new loss-history point, with the run's step/total and ETA. Its `id:` is
        `<run>.<step>-<k>` (point_ids). Before the points a resumed run logs again for steps a client holds,
        an `event: rewind` (`data: {"step": N}`) tells it to drop its points after step N."""
        reconnect = bool(last_id)
        last = BEFORE_ANY
        first = True
        newest: tuple[int, str | None] = (-1, None)
        pace = _Pace(self.poll, self.heartbeat)
        status_sent: str | None = None
        while True:
            check, beat = pace.tick()
            # The history's length and newest point say whether anything changed: only then is it read.
            marker = await self.store.history_marker(job_id)
            fresh: list[tuple[Key, dict[str, Any]]] = []
            starts: list[int] = []
            if first or marker != newest:
                newest = marker
                starts = run_starts((await self.store.get_fields([job_id], ["attempts"]))[0][0])
                # On (re)connect all the history is looked at once (it is capped); after that its tail, a longer
                # one while the oldest point read is still unsent: a runner back from a Redis outage, or a
                # scheduler filling in a dead runner's history, adds hundreds at once.
                count = self.store.history_max if first else HISTORY_TAIL
                while True:
                    points = await self.store.history(job_id, count)
                    keyed = list(zip(keys_of(points, starts), points, strict=True))
                    if len(points) < count or count >= self.store.history_max or keyed[0][0] <= last:
                        break
                    count = min(self.store.history_max, count * 4)
                first = False
                if reconnect:
                    reconnect = False
                    # An id this stream cannot have sent: skipping every point up to it would send none of the
                    # history, so the stream starts over, as the other streams do.
                    last = parse_id(last_id, starts)
                    if not could_have_sent(last, max((key for key, _ in keyed), default=BEFORE_ANY), len(starts)):
                        last = BEFORE_ANY
                fresh = [(key, p.model_dump(exclude_none=True)) for key, p in keyed if key > last]
            progress, now = await self._progress(job_id, created) if fresh else (None, None)
            said = ""
            if now is not None and now != status_sent and not JobStatus(now).is_terminal():
                status_sent = now  # (said with the points: those of a run again after a pause come without a pause)
                said = status_message(now)
            if fresh and progress is None:
                fresh = []  # the id is another job's now: the next status check ends the stream
                pace.sent = True
            if fresh and progress is not None:
                # A finished run's whole history (2,000 points by default) on connect: sent point by point, with no
                # turn for the loop's other requests between them, ten streams opening stalled them for 0.9 s.
                # A new run is said before its points; a rest (paused, queued again) after the points of the run
                # that ended, which it wrote before its end (review ER: "paused", then two more steps).
                ahead_of_points = said and now == JobStatus.RUNNING
                out: list[str] = [said] if ahead_of_points else []
                for key, point in fresh:
                    if (step := rewind_to(last, key, starts)) is not None:
                        out.append(message(json.dumps({"step": step}), event="rewind"))
                    last = key
                    out.append(message(json.dumps({**point, **progress}), event_id=format_id(key)))
                    if len(out) >= LINES_PER_SEND:
                        yield "".join(out)
                        out = []
                        await asyncio.sleep(0)
                if said and not ahead_of_points:
                    out.append(said)
                if out:
                    yield "".join(out)
            else:
                if check:
                    over, status = await self._ended(job_id, "train", created)
                    # Points the runner wrote before it recorded the end, after the marker was read: one more round.
                    if over and status == "deleted":  # (what is under the id now is not this stream's)
                        yield message(json.dumps({"status": status}), event="end")
                        return
                    if over and await self.store.history_marker(job_id) == newest:
                        last_progress = (await self._progress(job_id, created))[0] or {}
                        yield message(json.dumps({"status": status, **last_progress}), event="end")
                        return
                    pace.sent = pace.sent or over
                    if not over and status != status_sent:
                        status_sent = status
                        yield status_message(status)
                if beat:
                    yield ": keep-alive\n\n"
            await pace.sleep(bool(fresh))

    async def _same(self, job_id: str, created: float) -> bool:
        return _same((await self.store.get_fields([job_id], ["created_at"]))[0][0], created)

    async def _progress(self, job_id: str, created: float) -> tuple[dict[str, Any] | None, str | None]:
        """The job's progress for a message, and its status; (None, None) once the id is another job's."""
        raw, created_raw, status_raw = (await self.store.get_fields([job_id], ["progress", "created_at", "status"]))[0]
        if not _same(created_raw, created):
            return None, None
        p = json.loads(raw) if raw else {}
        keys = ("current_step", "max_steps", "remaining_seconds", "remaining_time", "percentage", "loss")
        return {"progress": {k: p.get(k) for k in keys}}, json.loads(status_raw) if status_raw else None


def status_message(status: str) -> str:
    """`event: status`: the job's status as the stream first sees it and at each change short of its end (paused,
    queued again, running): a follower showed "running" for a job paused hours ago (hunt CZ)."""
    return message(json.dumps({"status": status}), event="status")


def _same(created_raw: str | None, created: float) -> bool:
    """Is the job under this id still the one the stream was opened on (ids are freed by a delete)?"""
    return created_raw is not None and json.loads(created_raw) == created


def _event_id(raw: str | None) -> str | None:
    """A Redis stream id (`ms-seq`) Redis would take, or None: anything else would make XRANGE fail, and after
    the stream's 200 was sent."""
    if not raw or not _EVENT_ID.fullmatch(raw):
        return None
    return raw if all(int(part) <= _EVENT_ID_PART_MAX for part in raw.split("-")) else None
