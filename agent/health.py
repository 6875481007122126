"""Housekeeping every process with a core runs: real health for /ready, journal retention, the chain's head.

- The journal is probed with a real write and the store pinged every `interval`; /ready and the
  `optout_journal_up` / `optout_store_up` gauges report what was seen, never an assumption.
- When the store answers again after failing, the replayer is woken at once.
- Journal rows stored and published longer ago than the retention period are pruned (hourly): the
  journal holds full numbers on local disk only as long as it needs them.
- The audit chain's head is logged at INFO every hour, so a rewrite of the whole chain is caught against
  the logs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import timedelta

from agent import metrics
from agent.core import Core
from agent.errors import JournalError, OptOutError
from agent.lifecycle import within

log = logging.getLogger("agent.health")


class Health:
    """`run()` until cancelled; `journal_ok` and `store_ok` for /ready."""

    def __init__(
        self, core: Core, *, on_store_back: Callable[[], None] | None = None, interval: float = 2.0,
        retention: timedelta = timedelta(days=7), prune_every: float = 3600.0, head_every: float = 3600.0,
    ) -> None:
        self._core = core
        self._on_store_back = on_store_back
        self._interval = interval
        self._retention = retention
        self._prune_every = prune_every
        self._head_every = head_every
        self.store_ok = True
        self._last_prune = self._last_head = float("-inf")

    @property
    def journal_ok(self) -> bool:
        return self._core.journal.healthy

    async def run(self) -> None:
        while True:
            await self.check()
            now = time.monotonic()
            if now - self._last_prune >= self._prune_every:
                self._last_prune = now
                await self.prune()
            if now - self._last_head >= self._head_every and self.store_ok:
                self._last_head = now
                await self.log_head()
            await asyncio.sleep(self._interval)

    async def check(self) -> None:
        await self._core.journal.probe()
        try:
            await within(self._core.store.ping(), self._interval)
            ok = True
        except (OptOutError, TimeoutError) as exc:
            if self.store_ok:
                log.error("the store stopped answering (opt-outs stay journaled): %s", exc or "timeout")
            ok = False
        if ok and not self.store_ok:
            log.info("the store answers again")
            if self._on_store_back is not None:
                self._on_store_back()
        self.store_ok = ok
        metrics.STORE_UP.set(1 if ok else 0)

    async def prune(self) -> int:
        try:
            pruned = await self._core.journal.prune(self._retention)
        except JournalError as exc:
            log.error("journal prune failed: %s", exc)
            return 0
        if pruned:
            log.info("pruned %d journal rows stored and published over %s ago", pruned, self._retention)
        return pruned

    async def log_head(self) -> None:
        try:
            row, head = await self._core.store.chain_head()
        except OptOutError as exc:
            log.warning("could not read the audit chain's head: %s", exc)
            return
        log.info("audit chain head %s at row %d", head or "(empty)", row, extra={"chain_head": head, "row": row})
