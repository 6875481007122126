"""Loops stop when they are told to: Python 3.11's `asyncio.wait_for` drops a cancellation that arrives just as
what it awaits finishes, and a loop waiting on its wake-up event that way never stops (a shutdown that hangs;
the fuzz test's teardown hung a CI run so). Every wait in agent/ and sns_bridge/ goes through
`agent.lifecycle.within` (ruff bans `asyncio.wait_for` there); these tests cancel real loops at that moment."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable

import pytest

from agent.lifecycle import within
from agent.pipeline import OptOutPipeline, Replayer


async def stops_when_cancelled_as_it_wakes(run: Callable[[], Awaitable[None]], wake: Callable[[], None],
                                           times: int = 10) -> int:
    """Cancel `run` right after `wake`, `times` times; how many runs did NOT stop."""
    kept_running = 0
    for _ in range(times):
        task = asyncio.create_task(run())
        await asyncio.sleep(0.05)  # idle: waiting for its wake-up
        wake()
        await asyncio.sleep(0)  # the wait is over; the loop has not resumed yet
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if not done:
            kept_running += 1
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return kept_running


async def idle_loop(event: asyncio.Event, wait: Callable[[Awaitable[bool], float], Awaitable[bool]]) -> None:
    while True:
        event.clear()
        with contextlib.suppress(TimeoutError):
            await wait(event.wait(), 30.0)


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="3.12's wait_for keeps the cancellation")
async def test_python_3_11_wait_for_loses_the_cancellation_and_within_does_not() -> None:
    event = asyncio.Event()
    assert await stops_when_cancelled_as_it_wakes(lambda: idle_loop(event, asyncio.wait_for), event.set) == 10
    assert await stops_when_cancelled_as_it_wakes(lambda: idle_loop(event, within), event.set) == 0


async def test_the_replayer_stops_when_cancelled_as_it_is_woken(pipeline: OptOutPipeline) -> None:
    replayer = Replayer(pipeline, interval=30.0)
    assert await stops_when_cancelled_as_it_wakes(replayer.run, replayer.wake) == 0
