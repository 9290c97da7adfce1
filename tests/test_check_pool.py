"""The pool the disk checks of creates and uploads run in (check_pool): an owner's checks one at a time, in
threads of its own."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from application.services.check_pool import CheckPool


def gate() -> tuple[threading.Event, threading.Event, Callable[[], str]]:
    """A check that says it started, then waits until it is let go."""
    started, go = threading.Event(), threading.Event()

    def check() -> str:
        started.set()
        assert go.wait(10)
        return "checked"

    return started, go, check


async def until(event: threading.Event) -> None:
    async with asyncio.timeout(10):
        while not event.is_set():
            await asyncio.sleep(0.01)


async def test_an_owners_checks_run_one_after_the_other_and_others_beside_them() -> None:
    pool = CheckPool(threads=3, per_owner=1)  # (a thread to spare: only the owner's turn holds the second back)
    try:
        (a1_started, a1_go, a1), (a2_started, a2_go, a2), (b_started, b_go, b) = gate(), gate(), gate()
        first = asyncio.create_task(pool.run("alice", a1))
        await until(a1_started)
        second = asyncio.create_task(pool.run("alice", a2))
        other = asyncio.create_task(pool.run("bob", b))
        await until(b_started)  # another owner's check does not wait for alice's
        b_go.set()
        assert await other == "checked"
        assert not a2_started.is_set()  # alice's second waits for her first
        a1_go.set()
        assert await first == "checked"
        await until(a2_started)
        a2_go.set()
        assert await second == "checked"
    finally:
        pool.close()


async def test_a_check_whose_request_went_away_still_holds_its_owners_turn_until_it_ends() -> None:
    # (the thread cannot be stopped: a second check beside it would read a second big file at once)
    pool = CheckPool(threads=2, per_owner=1)
    try:
        (s1, go1, c1), (s2, go2, c2) = gate(), gate()
        gone = asyncio.create_task(pool.run("alice", c1))
        await until(s1)
        gone.cancel()
        next_one = asyncio.create_task(pool.run("alice", c2))
        for _ in range(3):
            await asyncio.sleep(0)  # (its turn: it waits on it, before any thread is asked for)
        assert not s2.is_set() and not next_one.done()
        go1.set()
        await until(s2)
        go2.set()
        assert await next_one == "checked"
    finally:
        pool.close()


async def test_a_failing_check_raises_its_error_and_frees_the_turn() -> None:
    pool = CheckPool(threads=1)

    def broken() -> None:
        raise ValueError("not a data set")

    try:
        for _ in range(2):
            try:
                await pool.run(None, broken)
            except ValueError as exc:
                assert str(exc) == "not a data set"
            else:
                raise AssertionError("no error")
        assert await pool.run(None, lambda: 7) == 7
    finally:
        pool.close()


async def test_by_default_an_owner_has_two_checks_under_way_and_a_third_waits() -> None:
    # (a server without keys is one owner: a small check passes one big one)
    pool = CheckPool()
    try:
        gates = [gate() for _ in range(3)]
        tasks = [asyncio.create_task(pool.run(None, check)) for _, _, check in gates]
        await until(gates[0][0])
        await until(gates[1][0])
        for _ in range(3):
            await asyncio.sleep(0)
        assert not gates[2][0].is_set()
        gates[1][1].set()
        await until(gates[2][0])
        for _, go, _ in gates:
            go.set()
        assert await asyncio.gather(*tasks) == ["checked"] * 3
    finally:
        pool.close()
