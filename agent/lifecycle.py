"""The lifecycle every long-lived resource shares: `async with` opens it and closes it.

Subclasses override `open()` when they have something to open, and `close()`, which must be idempotent.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self


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
