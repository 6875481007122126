"""The lifecycle every long-lived resource shares: `async with` opens it and closes it.

Subclasses override `open()` when they have something to open, and `close()`, which must be idempotent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from types import TracebackType
from typing import Self, TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], seconds: float) -> T:
    """`asyncio.wait_for`, minus Python 3.11's lost cancellation: when what it awaits finishes just as the task
    is cancelled, 3.11's wait_for returns the result and the cancellation is gone, so a loop told to stop
    runs on forever (tests/test_lifecycle.py shows it). `asyncio.timeout` keeps the cancellation, as 3.12's
    wait_for does. Raises TimeoutError. (`asyncio.wait_for` is banned in agent/ and sns_bridge/ by ruff.)"""
    async with asyncio.timeout(seconds):
        return await awaitable


class Resource:
    """An async context manager whose enter is `open()` and whose exit is `close()`."""

    async def open(self) -> None:
        """Acquire what the resource needs (nothing by default)."""

    async def close(self) -> None:
        """Release everything; safe to call twice."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
