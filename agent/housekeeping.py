"""Periodic upkeep every process with a core runs (hourly):

- journal rows stored and published longer ago than the retention period are pruned: the journal holds
  full numbers on local disk only as long as it needs them;
- the audit chain's head is logged at INFO, so a rewrite of the whole chain is caught against the logs.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from agent.errors import JournalError, OptOutError
from agent.journal import Journal
from agent.store import Store

log = logging.getLogger("agent.housekeeping")


class Housekeeping:
    """`run()` until cancelled: one `prune()` and one `log_head()` every `every` seconds, the first at once."""

    def __init__(self, *, journal: Journal, store: Store, retention: timedelta = timedelta(days=7),
                 every: float = 3600.0) -> None:
        self._journal = journal
        self._store = store
        self._retention = retention
        self._every = every

    async def run(self) -> None:
        while True:
            await self.prune()
            await self.log_head()
            await asyncio.sleep(self._every)

    async def prune(self) -> int:
        """Prune the journal's rows stored and published over `retention` ago; how many went (0 on failure)."""
        try:
            pruned = await self._journal.prune(self._retention)
        except JournalError as exc:
            log.error("journal prune failed: %s", exc)
            return 0
        if pruned:
            log.info("pruned %d journal rows stored and published over %s ago", pruned, self._retention)
        return pruned

    async def log_head(self) -> None:
        """Log the audit chain's head; a store that does not answer is logged as a warning."""
        try:
            row, head = await self._store.chain_head()
        except OptOutError as exc:
            log.warning("could not read the audit chain's head: %s", exc)
            return
        log.info("audit chain head %s at row %d", head or "(empty)", row, extra={"chain_head": head, "row": row})
