"""The blacklist lookup (`BlacklistChecker`): is a number listed? Never "clear" for a number that opted out.

Used by `optout check` and the dial guard (agent/dial_guard.py, whose FastAGI face is the
`precheck` script: "precheck" names only that dialplan contract).

- A number the view in Redis lists is blacklisted (writers put it there before the store has it).
- A "clear" from Redis is trusted only while the view is CURRENT (agent/cache.py): the lease, the sentinel
  and membership read in one MULTI. With `strict=True` (`optout check`) the store must also agree that the
  lease's sequence is its head and the lease's lineage the hash of that row (a store restored from a backup
  or a promoted replica is another history); when the store cannot be read, the lease alone decides.
- Otherwise the store answers, together with what writers hold unstored: the view's pending opt-outs (a
  lost set leaves them in the view hash) and this process's journal (an opt-out journaled here that the
  store does not have yet: the store down, locked, refusing). The journal is also how the embedded mode
  without Redis answers.
- When nobody can answer, the number's answer is None (callers fail closed).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from agent import metrics
from agent.cache import RedisCache
from agent.errors import CacheUnavailable, JournalError, StoreUnavailable
from agent.journal import Journal
from agent.phone import normalise
from agent.store import Position, Store

log = logging.getLogger("agent.lookup")


class BlacklistChecker:
    """Pre-dial checks for one number or a batch."""

    def __init__(self, *, store: Store, cache: RedisCache | None, journal: Journal | None, region: str) -> None:
        self._store = store
        self._cache = cache
        self._journal = journal
        self._region = region

    def normalise(self, numbers: Sequence[str]) -> list[str]:
        """E.164 forms of `numbers`; raises InvalidPhoneNumber naming the first bad one's position."""
        return [normalise(n, region=self._region, field=f"numbers[{i}]") for i, n in enumerate(numbers)]

    async def check(self, numbers: Sequence[str], *, strict: bool = False) -> list[bool | None]:
        """For each E.164 number: True blacklisted, False clear, None nobody can answer now."""
        answers: list[bool | None] = [None] * len(numbers)
        if not numbers:
            return []
        trusted = False
        held: set[str] = set()
        if self._cache is not None:
            try:
                cached = await self._cache.check(numbers)
                answers = [True if m else None for m in cached.members]
                if cached.lease is not None:
                    trusted = not strict or await self._store_agrees(cached.lease)
                if not trusted and not all(answers):
                    held = set((await self._cache.view()).pending.values())
            except CacheUnavailable as exc:
                metrics.CACHE_ERRORS.inc()
                log.debug("pre-dial check falls back to the store: %s", exc)
        unknown = [numbers[i] for i, a in enumerate(answers) if a is None]
        if not unknown:
            return answers
        if trusted:
            return [a if a is not None else False for a in answers]
        answers = [True if a is None and numbers[i] in held else a for i, a in enumerate(answers)]
        try:
            if self._journal is not None:
                held |= await self._journal.holding(unknown)
            found = await self._store.blacklisted([n for n in unknown if n not in held]) | held
        except (JournalError, StoreUnavailable) as exc:
            log.warning("pre-dial check: neither a current view nor the store and journal can answer: %s", exc)
            return [True if a is None and numbers[i] in held else a for i, a in enumerate(answers)]
        return [a if a is not None else numbers[i] in found for i, a in enumerate(answers)]

    async def _store_agrees(self, lease: Position) -> bool:
        try:
            store = await self._store.position(lease.seq)
        except StoreUnavailable:
            return True  # the lease was renewed within its time by a keeper that could read the store
        return store.head.seq <= lease.seq and store.lineage_at == lease.lineage
