"""Group commit for concurrent callers: what arrives while one batch is written goes in the next one.

Each caller still waits for its own item; under load, many items share one transaction or round trip.
The journal, the store and Redis writes all go through it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Calls `write(items) -> results` (same order) with everything queued.

    An exception raised by `write` reaches every caller of that batch; a result that *is* an exception
    reaches only its own caller (so one refused item does not fail the others).
    """

    def __init__(
        self, write: Callable[[Sequence[T]], Awaitable[Sequence[R | BaseException]]], *, max_batch: int = 256,
        name: str = "batch-flush",
    ) -> None:
        self._write = write
        self._max = max_batch
        self._name = name
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """Queue `item` and wait until its batch is written; returns its result."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        self._queue.append((item, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush(), name=self._name)
        return await fut

    async def idle(self) -> None:
        """Wait until everything queued so far has been written (errors go to the callers)."""
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self._max], self._queue[self._max :]
            try:
                results = await self._write([item for item, _ in batch])
            except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), res in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)
