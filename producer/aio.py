"""Cancellation that survives redis-py on Python 3.11.

redis-py sends every command through `asyncio.wait_for(..., socket_timeout)`. On Python 3.11,
`wait_for` swallows a cancellation that arrives in the same loop iteration as the inner
operation completes (CPython gh-86296, fixed in 3.12): the command returns normally and the task
carries on, although `task.cancelling()` says it was asked to stop. A reader loop hit that way
never ends (Ctrl-C on `voxqueue tail` was ignored), and a flusher would hang `aclose()`. So our
long-running loops check `cancelling()` themselves, and we cancel our own tasks until they end.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


def raise_if_cancelling() -> None:
    """Raise CancelledError if the current task was cancelled but a library swallowed it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def cancel_and_wait(task: asyncio.Task[Any], retry_every: float = 0.1) -> None:
    """Cancel `task` and wait for it to finish, re-cancelling if a cancellation gets lost.

    The task's own outcome is consumed (it was told to stop; how it stopped is of no interest);
    a cancellation of the caller still propagates.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=retry_every)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()
