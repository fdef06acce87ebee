"""The miniupnpc backend's worker thread (issue 17: a SimpleQueue hand-off instead of
ThreadPoolExecutor + wrap_future): requests run one at a time, in order, off the event loop;
a request whose caller gave up before it started is never sent; after close nothing starts."""

from __future__ import annotations

import asyncio
import functools
import threading

import pytest

from igdtrigger.gateway.upnp.miniupnpc import _Worker


async def test_jobs_run_in_order_on_one_thread_off_the_loop() -> None:
    worker = _Worker("test")
    ran: list[tuple[int, str]] = []

    def job(i: int) -> int:
        ran.append((i, threading.current_thread().name))
        return i * 10

    futs = [worker.submit(functools.partial(job, i)) for i in range(5)]
    assert await asyncio.gather(*futs) == [0, 10, 20, 30, 40]
    assert [i for i, _ in ran] == [0, 1, 2, 3, 4]
    assert {name for _, name in ran} == {"test"}
    assert threading.current_thread().name != "test"
    worker.close()


async def test_an_exception_reaches_the_caller() -> None:
    worker = _Worker("test")

    def fails() -> None:
        raise Exception("router said no")  # miniupnpc's own style

    with pytest.raises(Exception, match="router said no"):
        await worker.submit(fails)
    assert await worker.submit(lambda: 1) == 1  # the thread lives on
    worker.close()


async def test_a_job_its_caller_gave_up_on_is_never_run_and_none_after_close() -> None:
    worker = _Worker("test")
    gate, started = threading.Event(), threading.Event()
    ran: list[str] = []

    def blocking() -> str:
        started.set()
        gate.wait(10)
        ran.append("first")
        return "first"

    first = worker.submit(blocking)
    dropped = worker.submit(lambda: ran.append("dropped"))
    dropped.cancel()  # e.g. its timeout passed while the router was still busy
    kept = worker.submit(lambda: ran.append("kept"))
    gate.set()
    assert await first == "first"
    await kept
    assert ran == ["first", "kept"]

    gate.clear()
    started.clear()
    busy = worker.submit(blocking)
    queued = worker.submit(lambda: ran.append("after close"))
    assert await asyncio.to_thread(started.wait, 10)
    worker.close()
    with pytest.raises(RuntimeError, match="closed"):
        worker.submit(lambda: None)
    gate.set()
    assert await busy == "first"  # the one running ends normally
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(queued, 10)  # cancelled, not left hanging
    assert "after close" not in ran
