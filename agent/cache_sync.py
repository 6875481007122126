"""Keeping Redis fit to answer the pre-dial check: everything that repairs the cache lives here.

Every process that writes the blacklist writes Redis first (the pipeline, before the store), but a writer
whose Redis is unreachable, an eviction, a `DEL` or a Redis restart can leave the set behind the store.
The keeper (`CacheSync.run`, in the agent and the bridge) closes that gap every `interval`:

1. the journal's opt-outs that are not in the store yet go back into the set when this process's Redis
   write failed, or on start (they must stay visible whatever the store holds);
2. a set or sequence that is missing is rebuilt from the store (a set without the sentinel only a rebuild
   adds was lost, even if a writer's SADD re-created it since) (adding only: a number another agent
   journaled but could not store yet is never taken out);
3. otherwise the store's changes after `blacklist:seq` are applied in order, by compare-and-set, so
   keepers in many agents never apply them out of order; a removal never takes out a number whose
   opt-out was accepted after it;
4. the lease `blacklist:synced` is renewed for `lease` seconds, only once the set holds every change the
   store had when this round began and nothing of this process's is missing.

So a "clear" read while the lease exists was true at most `lease` seconds ago, and any writer's missed
change reaches Redis within one interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime

from agent import metrics
from agent.backoff import Backoff
from agent.cache import RedisCache
from agent.errors import CacheUnavailable, JournalError, StoreUnavailable
from agent.journal import Journal
from agent.store import Change, Removal, Store

log = logging.getLogger("agent.cache_sync")


class CacheSync:
    """The cache keeper. `run()` until cancelled; `rebuild(exact=True)` is `optout sync-cache --exact`."""

    def __init__(
        self, *, store: Store, cache: RedisCache, journal: Journal | None, interval: float = 0.25,
        lease: float = 2.0, batch: int = 5000,
    ) -> None:
        self._store = store
        self._cache = cache
        self._journal = journal
        self._interval = interval
        self._lease_ms = int(lease * 1000)
        self._batch = batch
        self.dirty = True
        """This process may hold opt-outs that are in neither Redis nor the store: re-add the journal's."""
        self.current = False
        """The last round proved the set current (and renewed the lease)."""

    def mark_dirty(self) -> None:
        """A write to Redis failed (the pipeline calls this): the lease is not renewed until repaired."""
        self.dirty = True

    async def run(self) -> None:
        """Keep the cache current until cancelled."""
        backoff = Backoff("redis cache sync", initial=0.25, maximum=5.0, logger=log)
        while True:
            try:
                await self.tick()
                metrics.CONNECTED.labels("redis").set(1)
                backoff.reset()
                delay = self._interval
            except (CacheUnavailable, StoreUnavailable, JournalError) as exc:
                self.current = False
                metrics.CACHE_CURRENT.set(0)
                if isinstance(exc, CacheUnavailable):
                    metrics.CONNECTED.labels("redis").set(0)
                    self.dirty = True
                delay = backoff.delay(exc)
            await asyncio.sleep(delay)

    async def tick(self, *, importing: bool = False) -> bool:
        """One round; True when the lease was renewed (the set is proven current). While a bulk import
        applies its own changes (and renews the lease), the round leaves the feed to it, unless `importing`
        (the importer itself catching up)."""
        self.current = False
        if self.dirty:
            await self.repush_pending()
        state = await self._cache.state()
        if state.seq is None or not state.set_exists:
            await self.rebuild()
            return False
        if state.importing and not importing:
            return False
        seq = state.seq
        head = await self._store.head()
        while seq < head:
            changes = await self._store.changes(seq, head, limit=self._batch)
            new = head if len(changes) < self._batch else changes[-1].seq
            if not await self._cache.apply(changes, expected=seq, new=new, lease_ms=0):
                return False  # another agent moved the set on: next round
            late = [(c.event_id, datetime.now(UTC)) for c in changes if c.op == "add" and not c.visible and c.event_id]
            if late:
                await self._store.record_visibility(late)
            seq = new
        metrics.CACHE_BEHIND.set(max(0, head - seq))
        if self.dirty:
            return False
        self.current = await self._cache.renew(seq, lease_ms=self._lease_ms)
        metrics.CACHE_CURRENT.set(1 if self.current else 0)
        return self.current

    async def settle_removal(self, removal: Removal) -> None:
        """Make a committed removal visible now. The feed applies it in order, but a rebuild (which only adds)
        that read the store after the removal keeps the number: it is taken out here only when Redis is at
        the store's head and the store no longer lists it (compare-and-set at that sequence, so any later
        change is applied after it, and an opt-out accepted since keeps its pending mark)."""
        await self.tick()
        state = await self._cache.state()
        if state.seq is None or not state.set_exists or state.seq < await self._store.head():
            return  # the keeper applies the feed, in order
        if await self._store.blacklisted([removal.phone_number]):
            return  # opted out again, stored after the removal
        change = Change(seq=state.seq, phone_number=removal.phone_number, op="remove", at=removal.at)
        await self._cache.apply([change], expected=state.seq, new=state.seq, lease_ms=0)

    async def repush_pending(self) -> int:
        """Put this journal's not-yet-stored numbers back in the set; clears `dirty`."""
        numbers = await self._journal.pending_numbers() if self._journal is not None else []
        if numbers:
            await self._cache.add_pending(numbers)
            log.info("re-added %d journaled opt-outs to Redis (not in the store yet)", len(numbers))
        self.dirty = False
        return len(numbers)

    async def rebuild(self, *, exact: bool = False) -> int:
        """Load the whole store into the set, then seal it at the store's sequence read before the copy
        (changes made meanwhile are applied again by the next round: every change is idempotent).

        One keeper at a time (a claim in Redis, renewed per batch); the seal adds the sentinel only if the
        set kept the rebuild's own member through the copy, so a set lost meanwhile is rebuilt again.
        Not exact (the keeper): numbers are only added, so an opt-out another agent journaled but could
        not store yet stays. Exact (`optout sync-cache --exact`): the set is replaced, so numbers the store
        no longer lists leave it too; running agents re-add their journaled opt-outs within a round.
        Returns how many numbers the store holds (-1 when another keeper is rebuilding or the copy was lost).
        """
        ttl_ms = max(10_000, self._lease_ms * 5)
        rebuild = await self._cache.claim_rebuild(ttl_ms=ttl_ms, exact=exact)
        if rebuild is None:
            return -1  # another keeper is at it
        total = 0
        sealed = False
        try:
            head = await self._store.head()
            async for batch in self._store.entries(batch_size=self._batch):
                await self._cache.add_entries(batch, set_key=rebuild.key)
                await self._cache.renew_rebuild(rebuild, ttl_ms=ttl_ms)
                total += len(batch)
            if exact:
                await self._cache.replace_set(rebuild)
            await self.repush_pending()
            sealed = await self._cache.seal(rebuild, seq=head)
        finally:
            if not sealed:
                with contextlib.suppress(CacheUnavailable):
                    await self._cache.release_rebuild(rebuild)
        if not sealed:
            log.warning("Redis blacklist rebuild not sealed (the set or the claim was lost during the copy): "
                        "the next round rebuilds it")
            return -1
        log.info("Redis blacklist rebuilt from the store: %d numbers (at change %d)", total, head)
        return total
