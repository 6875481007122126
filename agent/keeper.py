"""The cache keeper: the one owner of the dialers' view in Redis (the model: README, "Pre-dial check").

Every agent and bridge runs one (`run()`); CLI commands run rounds of their own when they need the view to
catch up. A round, woken by the store's push (a commit in any process) or every `interval`:
1. every process re-asserts the opt-outs its journal holds unstored, as pending (a Redis that lost them,
   restarted, flushed, evicted or failed over, has them back within a round, whatever the store holds);
2. whoever takes the keeper lock for the round: rebuilds a LOST view; when the store went back (a restored
   backup, a promoted replica: its row at the view's sequence is missing or has another chain hash), drops
   the lease, writes back what the store lost, rebuilds; when Redis went back (the view is behind what this
   keeper saw), holds the lease for `grace` so every process re-asserts first; else applies the store's
   changes in order and renews the lease once the set holds the head read this round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from datetime import UTC, datetime

from agent import metrics
from agent.backoff import Backoff
from agent.cache import Applied, RedisCache, View, ViewState, redis_errors
from agent.errors import CacheUnavailable, JournalError, StoreUnavailable
from agent.journal import Journal
from agent.lifecycle import within
from agent.optout import recovered_record
from agent.store import Change, Position, Store

log = logging.getLogger("agent.keeper")


class CacheKeeper:
    """`run()` until cancelled; `round()` once; `settle(seq)` until the view holds the store up to `seq`."""

    def __init__(self, *, store: Store, cache: RedisCache, journal: Journal | None, interval: float = 0.25,
                 lease: float = 2.0, grace: float = 1.0, batch: int = 5000) -> None:
        """`grace`: how long the lease is held after a swap, or after Redis went back, so every process (each
        re-asserting every round) puts its pending opt-outs back first: several of their rounds."""
        self._store = store
        self._cache = cache
        self._journal = journal
        self._interval = interval
        self._lease_ms = int(lease * 1000)
        self._lock_ms = max(self._lease_ms, 2000)
        self._grace_ms = int(grace * 1000)
        self._batch = batch
        self._lock = cache.keeper_lock(timeout=self._lock_ms / 1000)
        self._token = ""
        self._seen: Position | None = None
        """The newest view position this keeper saw: a view behind it means Redis lost writes."""
        self._rebuilt = -1
        self._wake = asyncio.Event()
        self.current = False
        """The last round proved the view current (and renewed the lease)."""

    # --- the loop -----------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Rounds until cancelled: at every commit the store reports, and every `interval`."""
        watcher = asyncio.create_task(self._watch(), name="cache-keeper-watch")
        backoff = Backoff("cache keeper", initial=0.25, maximum=5.0, logger=log)
        try:
            while True:
                self._wake.clear()
                try:
                    await self.round()
                    metrics.CONNECTED.labels("redis").set(1)
                    backoff.reset()
                    delay = self._interval
                except Exception as exc:
                    self.current = False
                    metrics.CACHE_CURRENT.set(0)
                    metrics.CONNECTED.labels("redis").set(0 if isinstance(exc, CacheUnavailable) else 1)
                    if not isinstance(exc, CacheUnavailable | StoreUnavailable | JournalError):
                        metrics.ISOLATED.labels("keeper").inc()
                        log.exception("cache keeper round failed unexpectedly; the next round starts over")
                    delay = backoff.delay(exc)
                with contextlib.suppress(TimeoutError):
                    await within(self._wake.wait(), delay)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _watch(self) -> None:
        backoff = Backoff("listening for store changes", initial=0.5, maximum=10.0, logger=log)
        while True:
            try:
                async for _ in self._store.watch():
                    backoff.reset()
                    self._wake.set()
            except StoreUnavailable as exc:
                await asyncio.sleep(backoff.delay(exc))

    async def round(self, *, rebuild: bool = False) -> bool:
        """One round (with `rebuild`, a rebuild from the store whatever the view's state); True when it proved the
        view current (the lease renewed)."""
        self.current = False
        await self.reassert()
        with redis_errors("taking the keeper lock"):
            self._token = uuid.uuid4().hex
            if not await self._lock.acquire(token=self._token):
                self.current = (await self._cache.view()).state is ViewState.CURRENT  # another keeps it this round
                return False
        try:
            self.current = await self._keep(rebuild=rebuild)
        finally:
            with contextlib.suppress(CacheUnavailable), redis_errors("giving the keeper lock back"):
                await self._lock.release()
        metrics.CACHE_CURRENT.set(1 if self.current else 0)
        return self.current

    async def rebuild(self) -> int:
        """`optout sync-cache`: a rebuild from the store now (waiting a few rounds for the lock). Returns how many
        numbers the view holds, -1 when the lock could not be had or the rebuild was not swapped in."""
        self._rebuilt = -1
        for _ in range(40):
            await self.round(rebuild=True)
            if self._rebuilt >= 0:
                return self._rebuilt
            await asyncio.sleep(self._interval / 2)
        return -1

    async def settle(self, upto: int, *, within: float = 10.0) -> bool:
        """Rounds until the view is current at `upto` or later (another process's keeper may do them)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            await self.round()
            view = await self._cache.view()
            if view.state is ViewState.CURRENT and view.lease is not None and view.lease.seq >= upto:
                return True
            await asyncio.sleep(self._interval / 4)
        return False

    async def reassert(self) -> int:
        """Put this process's journaled, not yet stored opt-outs back into the view as pending."""
        held = await self._journal.unstored_numbers() if self._journal is not None else []
        if held:
            await self._cache.assert_pending(held)
        return len(held)

    # --- the lock holder's part -----------------------------------------------------------------------------
    async def _keep(self, *, rebuild: bool) -> bool:
        view = await self._cache.view()
        if view.position is None or view.state in (ViewState.LOST, ViewState.REBUILDING):
            await self._rebuild()
            return False
        started = time.monotonic()
        store = await self._store.position(view.position.seq)
        if store.lineage_at != view.position.lineage:
            log.critical("the store went back: the view holds it up to change %d, the store's head is change %d%s; "
                         "dialers ask the store until the view is rebuilt, and numbers the store lost are written "
                         "back to it", view.position.seq, store.head.seq,
                         "" if store.lineage_at is None else " and that change has another hash (another history)")
            await self._cache.hold_lease(self._grace_ms)
            await self._recover(view, view.position, store.head)
        if rebuild or store.lineage_at != view.position.lineage:
            await self._rebuild()
            return False
        if self._seen is not None and view.position.seq < self._seen.seq:
            log.error("Redis went back (the view is at change %d, this keeper saw %d: a failover that lost writes?); "
                      "the lease is held until every process re-asserted its pending opt-outs",
                      view.position.seq, self._seen.seq)
            await self._cache.hold_lease(self._grace_ms)
        return await self._catch_up(view, store.head, started)

    async def _catch_up(self, view: View, head: Position, started: float) -> bool:
        """Apply the store's changes after the view's position up to `head`, in batches; the next batch is
        read from the store while Redis applies the current one."""
        assert view.position is not None
        at = view.position
        fetch = asyncio.ensure_future(self._changes(at, head))
        try:
            while True:
                changes, new = await fetch
                final = new == head
                if not final:
                    fetch = asyncio.ensure_future(self._changes(new, head))
                drop = await self._stored_pending(view, new.seq)
                lease_ms = self._lease_ms - int((time.monotonic() - started) * 1000) if final else 0
                done = await self._cache.apply(self._token, changes, expected=at, new=new,
                                               lease_ms=max(lease_ms, 0), lock_ms=self._lock_ms, drop_pending=drop)
                if done not in (Applied.DONE, Applied.HELD):
                    log.info("cache keeper round abandoned: %s", done.value)
                    return False
                self._seen = new
                seen_at = datetime.now(UTC)  # for opt-outs whose writer had no Redis: when the view showed them
                if late := [(c.event_id, seen_at) for c in changes if c.op == "add" and not c.visible and c.event_id]:
                    await self._store.record_visibility(late)
                if final:
                    metrics.CACHE_BEHIND.set(0)
                    return done is Applied.DONE and lease_ms > 0
                metrics.CACHE_BEHIND.set(head.seq - new.seq)
                at = new
        finally:
            if not fetch.done():
                fetch.cancel()
                with contextlib.suppress(asyncio.CancelledError, StoreUnavailable):
                    await fetch

    async def _changes(self, after: Position, head: Position) -> tuple[list[Change], Position]:
        """The next batch of changes after `after`, and the position it ends at (`head` for the last one)."""
        changes = await self._store.changes(after.seq, head.seq, limit=self._batch) if after.seq < head.seq else []
        if len(changes) < self._batch:
            return changes, head
        end = await self._store.position(changes[-1].seq)
        return changes, Position(changes[-1].seq, end.lineage_at or "")

    async def _stored_pending(self, view: View, upto: int) -> list[str]:
        """Pending opt-outs the store holds at or before `upto`: the set holds them as stored changes now."""
        if not view.pending:
            return []
        stored = await self._store.stored(list(view.pending))
        return [event_id for event_id, seq in stored.items() if seq <= upto]

    # --- rebuilds -----------------------------------------------------------------------------------------
    async def _rebuild(self) -> int:
        """Copy the store into `next` and swap it in at the head read before the copy (changes made meanwhile are
        applied by the next round: every change is idempotent)."""
        at = (await self._store.position()).head
        await self._cache.fill_next([], first=True)
        total = 0
        async for batch in self._store.entries(batch_size=self._batch):
            await self._cache.fill_next(batch, first=False)
            await self._extend()
            total += len(batch)
        done = await self._cache.swap(self._token, at, grace_ms=self._grace_ms, lock_ms=self._lock_ms,
                                      drop_pending=await self._stored_pending(await self._cache.view(), at.seq))
        if done is not Applied.DONE:
            log.warning("Redis blacklist rebuild not swapped in (%s): the next round rebuilds it", done.value)
            return -1
        self._seen, self._rebuilt = at, total
        log.info("Redis blacklist rebuilt from the store: %d numbers (at change %d)", total, at.seq)
        return total

    async def _extend(self) -> None:
        with redis_errors("extending the keeper lock"):
            await self._lock.extend(self._lock_ms / 1000, replace_ttl=True)

    async def _recover(self, view: View, went_back_from: Position, to: Position) -> None:
        """The store went back: numbers the view holds that the store lost (and no writer holds pending) are
        written back to it, audited, before the rebuild copies it."""
        pending, count = set(view.pending.values()), 0
        async for members in self._cache.members(batch=self._batch):
            listed = await self._store.blacklisted(members)
            numbers = [n for n in members if n not in listed and n not in pending]
            if numbers:
                entries = await self._cache.entries(numbers)
                await self._store.write([recovered_record(n, e, lineage=went_back_from.lineage,
                                                          listed_at=went_back_from.seq, back_to=to.seq)
                                         for n, e in zip(numbers, entries, strict=True)])
                count += len(numbers)
            await self._extend()
        if count:
            log.critical("%d numbers on the blacklist in Redis were missing from the store after it went back from "
                         "change %d to %d: written back to the store (origin admin, reason 'recovered')", count,
                         went_back_from.seq, to.seq)

