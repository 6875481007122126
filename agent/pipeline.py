"""The one opt-out pipeline every entry point calls (ARI, AGI, AMI, SNS, the CLI), and its replayer.

    validate -> journal (fsync) -> terminate the call -> store (blacklist + audit, one transaction)
             -> Redis (entry, set, action, counter: one round trip) -> journal marked stored

The call is ended only once the opt-out is on disk: a crash between the two could otherwise end a call
whose opt-out is lost (the fault suite caught exactly that). The journal is local and group-committed, so
this costs about a millisecond. Only the journal is critical for accepting an opt-out; a store failure
leaves it in the journal, and the Replayer stores it later (across restarts). Redis and the hangup are
best effort; a journal failure still ends the call, then raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum

from agent import metrics
from agent.backoff import Backoff
from agent.batching import Batcher
from agent.cache import RedisCache
from agent.constants import Outcome
from agent.errors import CacheUnavailable, JournalError, StoreUnavailable
from agent.journal import AppendResult, Journal
from agent.optout import HangupInfo, OptOutRecord
from agent.phone import mask
from agent.store import Store, StoreResult

log = logging.getLogger("agent.pipeline")

Terminator = Callable[[], Awaitable[HangupInfo]]


class Status(Enum):
    RECORDED = "recorded"
    """In the store (and, unless Redis failed, in Redis)."""
    JOURNALED = "journaled"
    """Durable in the journal; the store was unavailable, the replayer will store it."""
    DUPLICATE = "duplicate"
    """This event id was seen before; nothing changed."""


@dataclass(frozen=True)
class PipelineResult:
    status: Status
    record: OptOutRecord
    outcome: Outcome | None = None
    hangup: HangupInfo | None = None


class OptOutPipeline:
    """Journal, terminate, store, cache. Safe to call concurrently."""

    def __init__(
        self, *, journal: Journal, store: Store, cache: RedisCache | None, hangup_timeout: float = 2.0,
        on_stored: Callable[[], None] | None = None,
    ) -> None:
        self.journal = journal
        self.store = store
        self.cache = cache
        self._hangup_timeout = hangup_timeout
        self._inflight: set[str] = set()
        self._on_stored = on_stored
        # Concurrent opt-outs share store transactions and Redis round trips (group commit).
        self._store_batch: Batcher[OptOutRecord, StoreResult] = Batcher(store.record)
        self._cache_batch: Batcher[OptOutRecord, None] | None = Batcher(cache.write_optouts) if cache else None

    @property
    def inflight(self) -> frozenset[str]:
        return frozenset(self._inflight)

    async def submit(self, record: OptOutRecord, *, terminate: Terminator | None = None) -> PipelineResult:
        """Accept one validated opt-out. Raises JournalError only when it could not be made durable."""
        started = time.perf_counter()
        origin = record.origin.value
        if record.event_id in self._inflight:
            metrics.DUPLICATES.labels(origin).inc()
            return PipelineResult(Status.DUPLICATE, record)
        self._inflight.add(record.event_id)
        try:
            try:
                appended = await self.journal.append(record)
            except JournalError:
                if terminate is not None:
                    await self._terminate(terminate, origin)  # the call ends even when it cannot be recorded
                raise
            hangup = await self._terminate(terminate, origin) if terminate is not None else None
            if appended is not AppendResult.NEW:
                metrics.DUPLICATES.labels(origin).inc()
                return PipelineResult(Status.DUPLICATE, record, hangup=hangup)
            if hangup is not None:
                record = record.model_copy(update={"hangup": hangup})
            try:
                stored = await self._store_batch.submit(record)
            except StoreUnavailable as exc:
                metrics.STORE_ERRORS.inc()
                log.error(
                    "store unavailable, opt-out %s kept in the journal for replay: %s", record.event_id, exc,
                    extra={"event_id": record.event_id},
                )
                if hangup is not None:
                    await self.journal.replace(record)
                await self.journal.mark_failed(record.event_id, str(exc))
                return PipelineResult(Status.JOURNALED, record, hangup=hangup)
            await self.complete(record, stored)
            metrics.PIPELINE_LATENCY.observe(time.perf_counter() - started)
            if stored.duplicate:
                return PipelineResult(Status.DUPLICATE, record, hangup=hangup)
            return PipelineResult(Status.RECORDED, record, stored.outcome, hangup)
        finally:
            self._inflight.discard(record.event_id)

    async def _terminate(self, terminate: Terminator, origin: str) -> HangupInfo:
        try:
            info = await asyncio.wait_for(terminate(), self._hangup_timeout)
        except TimeoutError:
            info = HangupInfo(method="unknown", result="timeout")
        except Exception as exc:  # noqa: BLE001 - a failed hangup must not lose the opt-out
            log.warning("terminating the call failed: %s", exc)
            info = HangupInfo(method="unknown", result=f"error: {exc}"[:200])
        metrics.HANGUPS.labels(origin, info.result or "unknown").inc()
        return info

    async def complete(self, record: OptOutRecord, stored: StoreResult) -> None:
        """Redis and the journal mark, once the store has the record (also used by the replayer)."""
        origin = record.origin.value
        if stored.duplicate:
            metrics.DUPLICATES.labels(origin).inc()
            await self._recache_duplicate(record)
        else:
            metrics.OPTOUTS.labels(origin, stored.outcome.value if stored.outcome else "unknown").inc()
            if stored.newly_blacklisted:
                metrics.BLACKLIST_ADDITIONS.inc()
            if self._cache_batch is not None:
                try:
                    await self._cache_batch.submit(record)
                except CacheUnavailable as exc:
                    metrics.CACHE_ERRORS.inc()
                    log.warning("Redis write failed for %s (reconciliation repairs it): %s", record.event_id, exc)
        await self.journal.mark_stored([record.event_id])
        if self._on_stored is not None:
            self._on_stored()
        if stored.outcome is not None and record.phone_number:
            log.info(
                "opt-out %s: %s %s", stored.outcome.value, mask(record.phone_number), record.event_id,
                extra={"event_id": record.event_id, "origin": origin, "campaign_id": record.campaign_id},
            )


    async def _recache_duplicate(self, record: OptOutRecord) -> None:
        """A duplicate may be our own write whose acknowledgement was lost (then replayed): make sure Redis
        has the number, if the store still lists it (not a removed number's old event). No counter."""
        if self.cache is None or record.phone_number is None:
            return
        try:
            if await self.store.blacklisted([record.phone_number]):
                await self.cache.ensure_listed(record.entry())
        except (StoreUnavailable, CacheUnavailable) as exc:
            log.warning("could not re-check a duplicate's cache entry (reconciliation repairs it): %s", exc)
            if isinstance(exc, CacheUnavailable):
                await self.cache.mark_dirty()


class Replayer:
    """Stores what the journal holds and the store does not have yet, with backoff, until it is empty."""

    def __init__(self, pipeline: OptOutPipeline, *, interval: float = 1.0, batch: int = 200) -> None:
        self._pipeline = pipeline
        self._interval = interval
        self._batch = batch
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Run until cancelled."""
        backoff = Backoff("journal replay", initial=0.2, maximum=10.0, logger=log)
        while True:
            try:
                await self.drain()
                backoff.reset()
                delay = self._interval
            except StoreUnavailable as exc:
                metrics.STORE_ERRORS.inc()
                delay = backoff.delay(exc)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def drain(self) -> int:
        """Store every journaled record not in flight; returns how many were stored. Raises StoreUnavailable."""
        journal = self._pipeline.journal
        done = 0
        while True:
            inflight = self._pipeline.inflight
            pending = [r for r in await journal.unstored(self._batch) if r.event_id not in inflight]
            metrics.JOURNAL_DEPTH.set(await journal.depth())
            if not pending:
                return done
            results = await self._pipeline.store.record(pending)
            for record, stored in zip(pending, results, strict=True):
                await self._pipeline.complete(record, stored)
            done += len(pending)
            log.info("replayed %d journaled opt-outs into the store", len(pending))
