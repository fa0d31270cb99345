"""When to snapshot: every interval, when a store requests one (after a refit), and once more on a clean stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)


class CheckpointScheduler:
    """Calls `checkpoint(name)` for each index in `names()` every `interval_seconds`, and on request.

    The checkpoint function decides itself whether the index changed since its last snapshot. An
    interval of 0 turns the periodic snapshots off; requested ones still run. Failures are logged,
    never raised: the mutation log still contains every change, so a missed snapshot only makes the
    next recovery longer.
    """

    def __init__(
        self,
        checkpoint: Callable[[str], Awaitable[None]],
        names: Callable[[], list[str]],
        interval_seconds: float,
    ) -> None:
        self._checkpoint = checkpoint
        self._names = names
        self._interval = interval_seconds
        self._requested: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="midx-checkpoints")

    def request(self, name: str) -> None:
        """Snapshot index `name` soon, without waiting for the interval."""
        self._requested.add(name)
        self._wake.set()

    async def close(self, *, final: bool) -> None:
        """Stop the schedule; with `final`, snapshot every index once more first."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if final:
            for name in self._names():
                await self._run_one(name)

    async def _run(self) -> None:
        next_round = time.monotonic() + self._interval
        while True:
            timeout = max(0.0, next_round - time.monotonic()) if self._interval > 0 else None
            await wait_for_event(self._wake, timeout)
            self._wake.clear()
            due = set(self._requested)
            self._requested.clear()
            if self._interval > 0 and time.monotonic() >= next_round:
                due.update(self._names())
                next_round = time.monotonic() + self._interval
            for name in sorted(due):
                await self._run_one(name)

    async def _run_one(self, name: str) -> None:
        try:
            await self._checkpoint(name)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            logger.warning("snapshot of index %r failed (the mutation log still contains its changes): %s", name, error)


async def wait_for_event(event: asyncio.Event, timeout: float | None) -> None:
    """Wait until `event` is set or `timeout` seconds pass, whichever comes first.

    Unlike `asyncio.wait_for`, which on Python 3.11 can swallow a cancellation that arrives just as
    the event is set, a cancelled caller always gets CancelledError.
    """
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
