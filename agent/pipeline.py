"""The one opt-out pipeline every way in uses (ARI, AGI, AMI through agent/intake.py; SNS; the CLI) and its replayer.

    journal append -> hang up (when there is a call) -> [journal fsync | Redis | hangup confirmation]
                   -> store (blacklist + chained audit row, group-committed) -> journal marked stored

- The call is ended only once the opt-out would survive a crash of the agent (agent/journal.py says how
  durable that is); a crash between the two could otherwise end a call whose opt-out is lost.
- The dialers see the number as soon as the hangup request is out, whether or not the store is up.
- A store that is down leaves the opt-out journaled; the Replayer stores it later (across restarts). A
  record the store refuses (its data, not connectivity) is retried alone, then without its optional
  fields, and parked in the journal when even that fails, so it never blocks the others.
- When the journal itself cannot be written, the call is still ended and the opt-out goes straight to
  Redis and the store; JournalError is raised only when the store cannot take it either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum

from agent import metrics
from agent.backoff import Backoff
from agent.batching import Batcher
from agent.cache import RedisCache
from agent.constants import Outcome
from agent.errors import CacheUnavailable, JournalError, StoreRejected, StoreUnavailable
from agent.journal import PARK_AFTER, AppendResult, Journal, StoreState
from agent.lifecycle import within
from agent.optout import HangupInfo, OptOutRecord, clean_text
from agent.phone import mask
from agent.store import Store, StoreResult

log = logging.getLogger("agent.pipeline")

HangUp = Callable[[], Awaitable[HangupInfo]]
"""Sends the hangup and returns once it was answered; never raises (failures come back in the result)."""
Confirm = Callable[[HangupInfo], Awaitable[HangupInfo]]
"""Waits (bounded) for Asterisk's own record of the hangup and returns the completed HangupInfo."""


class Status(Enum):
    STORED = "stored"
    """In the store (and, unless Redis failed, in Redis)."""
    JOURNALED = "journaled"
    """Durable in the journal and visible in Redis; the store was unavailable and will have it once it answers
    again (the replayer stores it)."""
    REFUSED = "refused"
    """Durable in the journal and visible in Redis, but the store refused its data, even without its optional
    fields: retried by the replayer, parked after PARK_AFTER refusals (`optout parked` lists it)."""
    DUPLICATE = "duplicate"
    """This event id was seen before; nothing changed."""


@dataclass(frozen=True)
class PipelineResult:
    status: Status
    record: OptOutRecord
    outcome: Outcome | None = None
    hangup: HangupInfo | None = None


KEPT_WHEN_STRIPPED = frozenset({"source", "pressed_at", "journaled_at", "visible_at", "hangup"})
"""Beyond the record's required fields, what a stripped record keeps: typed values the store holds as such."""


def stripped(record: OptOutRecord, error: str) -> OptOutRecord:
    """The opt-out without the fields the store could refuse: the number is never dropped for them. Derived
    from the record type: every required field stays, every other one goes back to its default unless it is
    in KEPT_WHEN_STRIPPED (so a field added later is dropped here, never carried unchecked); the far end's
    hangup text goes too (its result keeps only its fixed label)."""
    update: dict[str, object] = {
        name: field.get_default(call_default_factory=True) for name, field in OptOutRecord.model_fields.items()
        if not field.is_required() and name not in KEPT_WHEN_STRIPPED}
    if record.hangup is not None:
        update["hangup"] = record.hangup.model_copy(
            update={"result": metrics.hangup_label(record.hangup.result), "method": None})
    update["reason"] = f"{record.reason}; other fields dropped, the store refused them: {clean_text(error, 200)}"
    return record.model_copy(update=update)


def failure(exc: BaseException) -> str:
    """A record's failure as one line for the journal and the log: its type and its message, cut."""
    return clean_text(f"{type(exc).__name__}: {exc}", 300)


class OptOutPipeline:
    """Journal, hang up, Redis, store. Safe to call concurrently."""

    def __init__(
        self, *, journal: Journal, store: Store, cache: RedisCache | None, hangup_timeout: float = 2.0,
        on_stored: Callable[[], None] | None = None,
    ) -> None:
        self.journal = journal
        self.store = store
        self.cache = cache
        self._hangup_timeout = hangup_timeout
        self._inflight: set[str] = set()
        self._held: dict[str, OptOutRecord] = {}
        """Opt-outs neither the journal nor the store took: retried by the replayer until one of them does."""
        self._on_stored = on_stored
        # Concurrent opt-outs share store transactions and Redis round trips (group commit).
        self._store_batch: Batcher[OptOutRecord, StoreResult] = Batcher(self.write_isolated, name="store-flush")
        self._cache_batch = Batcher(cache.write_optouts, name="redis-flush") if cache else None

    @property
    def inflight(self) -> frozenset[str]:
        return frozenset(self._inflight)

    async def submit(
        self, record: OptOutRecord, *, hang_up: HangUp | None = None, confirm: Confirm | None = None
    ) -> PipelineResult:
        """Accept one validated opt-out (and end its call with `hang_up`, once, when it is new).

        Raises JournalError only when neither the journal nor the store could take it.
        """
        started = time.perf_counter()
        origin = record.origin.value
        if record.event_id in self._inflight:
            metrics.DUPLICATES.labels(origin).inc()
            return PipelineResult(Status.DUPLICATE, record)
        self._inflight.add(record.event_id)
        try:
            record = record.model_copy(update={"journaled_at": datetime.now(UTC)})
            try:
                appended = await self.journal.append(record)
            except JournalError as exc:
                hangup = await self._hang_up(hang_up, origin) if hang_up is not None else None
                return await self._direct(record.model_copy(update={"hangup": hangup, "journaled_at": None}), exc)
            if not appended.new:
                metrics.DUPLICATES.labels(origin).inc()
                return PipelineResult(Status.DUPLICATE, record)
            if appended is AppendResult.CONFLICT:
                metrics.EVENT_ID_CONFLICTS.inc()
                log.warning("eventId %r was used before for another number: stored as a separate opt-out",
                            record.source_event_id, extra={"event_id": record.event_id})
            hangup = await self._hang_up(hang_up, origin) if hang_up is not None else None
            record = await self._after_hangup(record, hangup, confirm)
            result = await self._store(record)
            metrics.PIPELINE_LATENCY.observe(time.perf_counter() - started)
            return result
        finally:
            self._inflight.discard(record.event_id)

    async def _hang_up(self, hang_up: HangUp, origin: str) -> HangupInfo:
        try:
            info = await within(hang_up(), self._hangup_timeout)
        except TimeoutError:
            info = HangupInfo(method="unknown", result="timeout")
        except Exception as exc:  # noqa: BLE001 - a failed hangup must not lose the opt-out
            log.warning("hanging up the call failed: %s", exc)
            info = HangupInfo(method="unknown", result=f"error: {exc}")
        metrics.HANGUPS.labels(origin, metrics.hangup_label(info.result)).inc()
        return info

    async def _after_hangup(self, record: OptOutRecord, hangup: HangupInfo | None,
                            confirm: Confirm | None) -> OptOutRecord:
        """fsync, Redis and the hangup's confirmation, side by side: none of them waits for another."""
        confirmed = confirm(hangup) if confirm is not None and hangup is not None else asyncio.sleep(0, hangup)
        synced, visible_at, info = await asyncio.gather(
            self.journal.sync(), self.make_visible(record), confirmed, return_exceptions=True)
        if isinstance(synced, BaseException):
            log.critical("journal fsync failed (the opt-out survives a crash of the agent, not a power loss, "
                         "until the store has it): %s", synced, extra={"event_id": record.event_id})
        update = {"visible_at": visible_at if isinstance(visible_at, datetime) else None,
                  "hangup": info if isinstance(info, HangupInfo) else hangup}
        return record.model_copy(update={k: v for k, v in update.items() if v is not None})

    async def make_visible(self, record: OptOutRecord) -> datetime | None:
        """Write the opt-out to Redis (dialers see it); the time Redis confirmed it, None when it failed."""
        if self._cache_batch is None:
            return None
        try:
            visible_at = await self._cache_batch.submit(record)
        except CacheUnavailable as exc:
            metrics.CACHE_ERRORS.inc()
            log.warning("Redis write failed for %s (re-asserted from the journal every keeper round, and the "
                        "keeper applies it from the store): %s", record.event_id, exc)
            return None
        if record.phone_number is not None:
            metrics.PRESS_TO_VISIBLE.observe(
                max(0.0, (visible_at - (record.pressed_at or record.received_at)).total_seconds()))
        return visible_at

    async def _store(self, record: OptOutRecord) -> PipelineResult:
        try:
            stored = await self._store_batch.submit(record)
        except StoreUnavailable as exc:
            metrics.STORE_ERRORS.inc()
            log.error("store unavailable, opt-out %s kept in the journal for replay: %s", record.event_id, exc,
                      extra={"event_id": record.event_id})
            await self._keep(record, str(exc), rejected=False)
            return PipelineResult(Status.JOURNALED, record, hangup=record.hangup)
        except StoreRejected as exc:
            await self._keep(record, str(exc), rejected=True)
            return PipelineResult(Status.REFUSED, record, hangup=record.hangup)
        await self.complete(record, stored)
        if stored.duplicate:
            return PipelineResult(Status.DUPLICATE, record, hangup=record.hangup)
        return PipelineResult(Status.STORED, record, stored.outcome, record.hangup)

    async def _keep(self, record: OptOutRecord, error: str, *, rejected: bool) -> None:
        """The store did not take it: keep the journaled copy current and count the attempt."""
        try:
            await self.journal.replace(record)
            await self.note_failed(record, error, rejected=rejected)
        except JournalError as exc:
            log.error("could not note the failed store attempt in the journal: %s", exc)

    async def _direct(self, record: OptOutRecord, journal_error: JournalError) -> PipelineResult:
        """The journal failed: Redis and the store directly, so the opt-out is not lost with it."""
        log.critical("journal failed (%s): writing opt-out %s straight to Redis and the store", journal_error,
                     record.event_id, extra={"event_id": record.event_id})
        visible_at = await self.make_visible(record)
        if visible_at is not None:
            record = record.model_copy(update={"visible_at": visible_at})
        try:
            stored = await self._store_batch.submit(record)
        except (StoreUnavailable, StoreRejected) as exc:
            where = "only in Redis" if visible_at else "in neither Redis nor the store"
            self._held[record.event_id] = record
            metrics.HELD.set(len(self._held))
            raise JournalError(f"opt-out {record.event_id} could not be journaled nor stored, it is {where}: "
                               f"{journal_error}; {exc}; held in memory and retried") from exc
        self._count(record, stored)
        return PipelineResult(Status.STORED, record, stored.outcome, record.hangup)

    async def write_isolated(self, records: Sequence[OptOutRecord]) -> list[StoreResult | BaseException]:
        """Store a batch. A failure of its data, of any exception type but StoreUnavailable (a refusal, or a
        value the store's driver cannot convert), is narrowed down: each record alone, then without its
        optional fields; what still fails comes back as its StoreRejected. StoreUnavailable is raised."""
        batch = await self._write(records)
        if not isinstance(batch, Exception):
            return list(batch)
        if len(records) > 1:
            log.warning("store failed a batch of %d, retrying one by one: %s", len(records), failure(batch))
        out: list[StoreResult | BaseException] = []
        for record in records:
            alone = await self._write([record])
            if isinstance(alone, Exception):
                error = failure(alone)
                metrics.ISOLATED.labels("store").inc()
                log.warning("store refused opt-out %s (%s); storing it without its optional fields",
                            record.event_id, error, extra={"event_id": record.event_id})
                alone = await self._write([stripped(record, error)])
            if isinstance(alone, Exception):
                out.append(alone if isinstance(alone, StoreRejected) else StoreRejected(failure(alone)))
            else:
                out.extend(alone)
        return out

    async def _write(self, records: Sequence[OptOutRecord]) -> list[StoreResult] | Exception:
        """The store's answer; any failure but StoreUnavailable (raised) comes back, to be isolated."""
        try:
            return await self.store.write(records)
        except StoreUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - one record's failure must not fail the others
            return exc

    async def retry_held(self) -> int:
        """Put the opt-outs held in memory into the journal (then they are stored as any journaled one), or
        straight into the store while the journal still fails. Returns how many are still held."""
        for event_id, record in list(self._held.items()):
            where = "journaled"
            try:
                await self.journal.append(record)
            except JournalError:
                try:
                    stored = await self._store_batch.submit(record)
                except (StoreUnavailable, StoreRejected):
                    continue
                self._count(record, stored)
                where = "stored"
            del self._held[event_id]
            log.warning("opt-out %s, held in memory, is %s now", event_id, where, extra={"event_id": event_id})
        metrics.HELD.set(len(self._held))
        return len(self._held)

    def _count(self, record: OptOutRecord, stored: StoreResult) -> None:
        origin = record.origin.value
        if stored.duplicate:
            metrics.DUPLICATES.labels(origin).inc()
            return
        metrics.OPTOUTS.labels(origin, stored.outcome.value if stored.outcome else "unknown").inc()
        if stored.newly_blacklisted:
            metrics.BLACKLIST_ADDITIONS.inc()
        if stored.outcome is not None and record.phone_number:
            log.info("opt-out %s: %s %s", stored.outcome.value, mask(record.phone_number), record.event_id,
                     extra={"event_id": record.event_id, "origin": origin, "campaign_id": record.campaign_id})

    async def complete(self, record: OptOutRecord, stored: StoreResult) -> None:
        """Metrics and the journal mark, once the store has the record (also used by the replayer)."""
        self._count(record, stored)
        await self.journal.mark([record.event_id], StoreState.STORED)
        if self._on_stored is not None:
            self._on_stored()

    async def note_failed(self, record: OptOutRecord, error: str, *, rejected: bool) -> None:
        """Count a failed store attempt in the journal (also used by the replayer); log it once it is parked."""
        if await self.journal.mark_failed(record.event_id, error, rejected=rejected):
            log.error("opt-out %s parked: the store refused it %d times (%s); it stays in the journal, visible "
                      "to the dialers, and `optout parked` lists it", record.event_id, PARK_AFTER, error,
                      extra={"event_id": record.event_id})


class Replayer:
    """Stores what the journal holds and the store does not have yet, with backoff, until it is empty."""

    def __init__(self, pipeline: OptOutPipeline, *, interval: float = 1.0, batch: int = 200) -> None:
        self._pipeline = pipeline
        self._interval = interval
        self._batch = batch
        self._wake = asyncio.Event()
        self._reported: set[str] = set()

    def wake(self) -> None:
        """Replay now (the health monitor calls this when the store answers again)."""
        self._wake.set()

    async def run(self) -> None:
        """Run until cancelled. A record's failure is isolated to it inside `drain`; the store being down
        backs off, and so does anything else unforeseen (logged, counted), so the loop never stops."""
        backoff = Backoff("journal replay", initial=0.2, maximum=10.0, logger=log)
        while True:
            try:
                await self.drain()
                backoff.reset()
                delay = self._interval
            except StoreUnavailable as exc:
                metrics.STORE_ERRORS.inc()
                delay = backoff.delay(exc)
            except Exception as exc:  # the replayer must outlive whatever a pass meets
                metrics.ISOLATED.labels("replayer").inc()
                log.exception("journal replay pass failed; retrying")
                delay = backoff.delay(failure(exc))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await within(self._wake.wait(), delay)

    async def drain(self) -> int:
        """Store every journaled record not in flight and not parked; returns how many were stored.

        A record that fails, with any exception, is retried alone (next pass) and parked with its reason
        after PARK_AFTER failures, so it never holds back the others. Raises StoreUnavailable."""
        pipeline, journal = self._pipeline, self._pipeline.journal
        await pipeline.retry_held()
        done = 0
        failed: set[str] = set()
        while True:
            rows = await journal.unstored(self._batch + len(failed))
            inflight = pipeline.inflight  # after the read: a press journaled meanwhile is the pipeline's to store
            pending = [r for r in rows if r.event_id not in inflight and r.event_id not in failed][: self._batch]
            metrics.JOURNAL_DEPTH.set(await journal.depth())
            if not pending:
                metrics.JOURNAL_PARKED.set(len(await journal.parked()))
                return done
            results = await pipeline.write_isolated(pending)
            for record, res in zip(pending, results, strict=True):
                if isinstance(res, StoreResult):
                    try:
                        await pipeline.complete(record, res)
                    except JournalError as exc:  # stored: a lost mark only repeats an idempotent write
                        log.warning("opt-out %s stored, but the journal mark failed: %s", record.event_id, exc)
                    done += 1
                    continue
                failed.add(record.event_id)  # once per pass: the next pass retries it
                self._note_failure(record, failure(res))
                await pipeline.note_failed(record, failure(res), rejected=True)
            log.info("replayed %d journaled opt-outs into the store", done)

    def _note_failure(self, record: OptOutRecord, error: str) -> None:
        """Log a record's failure once per process (each attempt is counted in the journal)."""
        if record.event_id in self._reported:
            return
        if len(self._reported) > 10_000:
            self._reported.clear()
        self._reported.add(record.event_id)
        log.warning("journaled opt-out %s failed in the store (%s); retried alone, set aside after %d failures",
                    record.event_id, error, PARK_AFTER, extra={"event_id": record.event_id})
