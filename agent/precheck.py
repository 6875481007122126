"""The pre-dial check and the reconciliation that keeps Redis fit to answer it.

The check never answers "clear" for a number the store holds: Redis answers only while its set is
marked complete (`blacklist:synced`); when Redis is down or was restarted empty, the store answers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from agent import metrics
from agent.backoff import Backoff
from agent.cache import RedisCache
from agent.errors import CacheUnavailable, StoreUnavailable
from agent.phone import normalise
from agent.store import Store

log = logging.getLogger("agent.precheck")


class BlacklistChecker:
    """`is_blacklisted` for one number or a batch."""

    def __init__(self, *, store: Store, cache: RedisCache | None, region: str) -> None:
        self._store = store
        self._cache = cache
        self._region = region

    def normalise(self, numbers: Sequence[str]) -> list[str]:
        """E.164 forms of `numbers`; raises InvalidPhoneNumber naming the first bad one's position."""
        return [normalise(n, region=self._region, field=f"numbers[{i}]") for i, n in enumerate(numbers)]

    async def check(self, numbers: Sequence[str]) -> list[bool]:
        """For each E.164 number, whether it is blacklisted. Raises StoreUnavailable when nobody can answer."""
        if not numbers:
            return []
        if self._cache is not None:
            try:
                answer = await self._cache.check(numbers)
            except CacheUnavailable as exc:
                metrics.CACHE_ERRORS.inc()
                log.debug("pre-dial check falls back to the store: %s", exc)
                answer = None
            if answer is not None:
                return answer
        found = await self._store.blacklisted(numbers)
        return [n in found for n in numbers]

    async def is_blacklisted(self, number: str) -> bool:
        """One raw number (any format the default region reads). Raises InvalidPhoneNumber, StoreUnavailable."""
        [e164] = self.normalise([number])
        [answer] = await self.check([e164])
        return answer


class CacheReconciler:
    """Refills Redis from the store at start, when Redis comes back, and whenever its set is unmarked."""

    def __init__(self, *, store: Store, cache: RedisCache, interval: float = 2.0) -> None:
        self._store = store
        self._cache = cache
        self._interval = interval

    async def run(self) -> None:
        """Run until cancelled."""
        backoff = Backoff("redis reconciliation", initial=0.5, maximum=10.0, logger=log)
        while True:
            try:
                if not await self._cache.is_synced():
                    total = await self._cache.sync_from(self._store)
                    log.info("Redis blacklist rebuilt from the store: %d numbers", total)
                metrics.CONNECTED.labels("redis").set(1)
                backoff.reset()
                delay = self._interval
            except (CacheUnavailable, StoreUnavailable) as exc:
                if isinstance(exc, CacheUnavailable):
                    metrics.CONNECTED.labels("redis").set(0)
                delay = backoff.delay(exc)
            await asyncio.sleep(delay)
