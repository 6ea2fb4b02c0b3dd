"""Whether a worker that waits on an asyncio.Event with a timeout ends when it is cancelled just as it is
woken.

Python 3.11's `asyncio.wait_for` returned its awaitable's result when the cancellation arrived after that
had finished but before wait_for resumed: the cancellation was lost, a worker looping on it ran on, and the
daemon's stop, which cancels its workers and waits for them, waited for good (pyproject.toml bans
wait_for). Which turn of the event loop the cancellation must arrive in depends on how the wait is
written, so each of the first few turns after the wake is tried.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

TURNS = 6  # event loop turns between the wake and the cancellation that are tried


async def idle(wake: asyncio.Event) -> None:
    """Until a task waits on `wake` (asyncio.Event keeps its waiters in `_waiters`, a deque)."""
    async with asyncio.timeout(30):
        while not getattr(wake, "_waiters", None):
            await asyncio.sleep(0.01)


async def assert_ends_when_cancelled_as_woken(
    start: Callable[[], tuple[Coroutine[Any, Any, None], asyncio.Event]],
) -> None:
    """For each of the first TURNS turns: a fresh worker from `start` (its coroutine and the Event it
    waits on), woken once it waits, cancelled that many turns later, must end."""
    for turns in range(TURNS):
        work, wake = start()
        task = asyncio.ensure_future(work)
        await idle(wake)
        wake.set()
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=10)
        if not done:
            task.cancel()  # once more, so the test itself ends
            await asyncio.wait({task}, timeout=10)
        assert done, f"cancelled {turns} loop turns after its wake, the worker ran on"
        assert task.cancelled()
