"""Real health for /ready, in every process with a core (retention and the chain's head: agent/housekeeping.py).

- The journal is probed with a real write and the store pinged every `interval`; /ready and the
  `optout_journal_up` / `optout_store_up` gauges report what was seen, never an assumption.
- When the store answers again after failing, the replayer is woken at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from agent import metrics
from agent.core import Core
from agent.errors import OptOutError
from agent.lifecycle import within

log = logging.getLogger("agent.health")


class Health:
    """`run()` until cancelled; `journal_ok` and `store_ok` for /ready."""

    def __init__(self, core: Core, *, on_store_back: Callable[[], None] | None = None, interval: float = 2.0) -> None:
        self._core = core
        self._on_store_back = on_store_back
        self._interval = interval
        self.store_ok = True

    @property
    def journal_ok(self) -> bool:
        return self._core.journal.healthy

    async def run(self) -> None:
        while True:
            await self.check()
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
