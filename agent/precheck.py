"""The pre-dial check: never "clear" for a number that opted out.

- A number Redis lists is blacklisted (Redis is written before the store, so during a store outage it is the
  only place that already knows).
- A "clear" from Redis is trusted only while the set is proven current: the lease `blacklist:synced` exists
  (an agent checked within the lease time that the set holds every change of the store) and the set
  exists. With `strict=True` (`optout check`) the lease's sequence must also have reached the store's own
  head, read now; when the store cannot be read, the lease alone decides.
- Otherwise the store answers; when nobody can answer, the number's answer is None (callers fail closed).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from agent import metrics
from agent.cache import RedisCache
from agent.errors import CacheUnavailable, StoreUnavailable
from agent.phone import normalise
from agent.store import Store

log = logging.getLogger("agent.precheck")


class BlacklistChecker:
    """Pre-dial checks for one number or a batch."""

    def __init__(self, *, store: Store, cache: RedisCache | None, region: str) -> None:
        self._store = store
        self._cache = cache
        self._region = region

    def normalise(self, numbers: Sequence[str]) -> list[str]:
        """E.164 forms of `numbers`; raises InvalidPhoneNumber naming the first bad one's position."""
        return [normalise(n, region=self._region, field=f"numbers[{i}]") for i, n in enumerate(numbers)]

    async def check(self, numbers: Sequence[str], *, strict: bool = False) -> list[bool | None]:
        """For each E.164 number: True blacklisted, False clear, None nobody can answer now."""
        answers: list[bool | None] = [None] * len(numbers)
        if not numbers:
            return []
        current = False
        if self._cache is not None:
            try:
                cached = await self._cache.check(numbers)
                answers = [True if m else None for m in cached.members]
                current = cached.current
                if current and strict and cached.lease is not None:
                    current = await self._caught_up(cached.lease)
            except CacheUnavailable as exc:
                metrics.CACHE_ERRORS.inc()
                log.debug("pre-dial check falls back to the store: %s", exc)
        unknown = [i for i, a in enumerate(answers) if a is None]
        if not unknown:
            return answers
        if current:
            return [a if a is not None else False for a in answers]
        try:
            found = await self._store.blacklisted([numbers[i] for i in unknown])
        except StoreUnavailable as exc:
            log.warning("pre-dial check: neither a current cache nor the store can answer: %s", exc)
            return answers
        for i in unknown:
            answers[i] = numbers[i] in found
        return answers

    async def _caught_up(self, lease_seq: int) -> bool:
        try:
            return lease_seq >= await self._store.head()
        except StoreUnavailable:
            return True  # the lease was renewed within its time by an agent that could read the store
