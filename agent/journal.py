"""The local durable journal: every opt-out is written here before the call is ended.

SQLite in WAL mode. Two ways to be durable (`OPTOUT_JOURNAL_SYNC`):
- `relaxed` (default): an append commits with `synchronous=NORMAL`, so it is in the operating system's page
  cache when the call is ended: it survives a crash of the agent (SIGKILL included), not a power loss of
  the machine. `sync()` then fsyncs the WAL, on a thread of its own, right after the hangup request is
  out and before the store step. The only window left is a power loss within that fsync, which also drops
  the call.
- `strict`: every batch holding a `durable` operation (an append) commits with `synchronous=FULL`, i.e. is
  fsynced before the call is ended; `sync()` has nothing left to do.
Each write is one `JournalOp`, group-committed (agent/batching.py): what comes during a batch goes in the next.

Why the SNS outbox, the park list and the health probe live here: one row per opt-out carries its store
state and its publish state, so each transition is one atomic SQLite update in the same file that made the
press durable; an outbox or a park list of its own would need a second durable file and a commit across the
two. The probe writes here because what it proves is that this file still takes writes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum, auto
from pathlib import Path
from typing import ClassVar, Final, Generic, Literal, TypeVar, cast

from agent import metrics
from agent.batching import Batcher
from agent.errors import JournalError
from agent.lifecycle import Resource
from agent.optout import OptOutRecord
from agent.sqlite_db import SqliteDb, transaction

log = logging.getLogger("agent.journal")

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
JournalSync = Literal["relaxed", "strict"]
PARK_AFTER = 3
"""Refusals by the store (not connectivity failures) after which a record is parked."""


class StoreState(Enum):
    """A row's way into the system of record (column `store_state`, by name)."""
    PENDING = auto()
    """Journaled, not stored yet: the pipeline stores it, else the replayer (Append; Unpark from PARKED)."""
    STORED = auto()
    """In the store (Mark, by the pipeline or the replayer). Final."""
    PARKED = auto()
    """Refused by the store PARK_AFTER times (Failed): skipped by the replayer, still seen by the dialers."""


class PublishState(Enum):
    """A row's way out to SNS, the outbox (column `publish_state`, by name)."""
    NOT_NEEDED = auto()
    """Journaled while publishing was off (Append). Final."""
    PENDING = auto()
    """In the outbox: the publisher sends it (Append; Unpark from REFUSED)."""
    PUBLISHED = auto()
    """SNS took it (Mark, by the publisher). Final."""
    REFUSED = auto()
    """SNS refused it for good (Mark, by the publisher): out of the outbox, listed by `optout parked`."""


def _is(state: StoreState | PublishState, op: str = "=") -> str:
    """`store_state = 'PARKED'`, for a SET or a WHERE: a literal, so that the partial indexes serve."""
    return f"{'store' if isinstance(state, StoreState) else 'publish'}_state {op} {state.name!r}"


_UNSTORED = _is(StoreState.STORED, "!=")
_SCHEMA_VERSION = 4
_TABLE = f"""(event_id TEXT PRIMARY KEY, record TEXT NOT NULL, journaled_at TEXT NOT NULL,
    store_state TEXT NOT NULL CHECK (store_state IN ({','.join(repr(s.name) for s in StoreState)})),
    publish_state TEXT NOT NULL CHECK (publish_state IN ({','.join(repr(s.name) for s in PublishState)})),
    attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT, refusals INTEGER NOT NULL DEFAULT 0,
    phone_number TEXT, source_event_id TEXT)"""
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS journal {_TABLE};
CREATE INDEX IF NOT EXISTS journal_unstored ON journal (journaled_at) WHERE {_is(StoreState.PENDING)};
CREATE INDEX IF NOT EXISTS journal_unpublished ON journal (journaled_at) WHERE {_is(PublishState.PENDING)};
CREATE INDEX IF NOT EXISTS journal_unstored_number ON journal (phone_number) WHERE {_UNSTORED};
CREATE INDEX IF NOT EXISTS journal_source ON journal (source_event_id) WHERE source_event_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS journal_probe (id INTEGER PRIMARY KEY, at TEXT NOT NULL);
"""


def _upgrade(conn: sqlite3.Connection, columns: set[str]) -> None:
    """Versions 1-3 kept the states as integers: stored 0/1, published 0/1 (2 = refused), parked 0/1 (version
    1 also lacked parked, refusals, phone_number and source_event_id). Rebuilt in the caller's transaction."""
    def old(column: str, default: str = "NULL") -> str:
        return column if column in columns else default

    conn.execute(f"CREATE TABLE journal_v4 {_TABLE}")
    conn.execute(  # published = 1 meant published or not needed alike: both leave nothing to publish
        "INSERT INTO journal_v4 SELECT event_id, record, journaled_at,"
        f" CASE WHEN stored = 1 THEN {StoreState.STORED.name!r} WHEN {old('parked', '0')} = 1"
        f" THEN {StoreState.PARKED.name!r} ELSE {StoreState.PENDING.name!r} END, CASE published"
        f" WHEN 0 THEN {PublishState.PENDING.name!r} WHEN 2 THEN {PublishState.REFUSED.name!r}"
        f" ELSE {PublishState.PUBLISHED.name!r} END, attempts, last_error, {old('refusals', '0')},"
        f" {old('phone_number')}, {old('source_event_id')} FROM journal")
    conn.execute("DROP TABLE journal")  # its indexes with it: _SCHEMA makes them on the new columns
    conn.execute("ALTER TABLE journal_v4 RENAME TO journal")


def _fsync_path(path: str | Path, missing_ok: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        if missing_ok:  # a WAL checkpointed away: what it held is in the database file, synced by the checkpoint
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AppendResult(Enum):
    NEW = "new"
    """First time this event id is seen."""
    CONFLICT = "conflict"
    """New, but its producer's eventId was seen before with another number (both are opt-outs)."""
    PENDING = "pending"
    """Seen before and not yet in the store (being processed, or waiting for the replayer)."""
    STORED = "stored"
    """Seen before and already in the store."""

    @property
    def new(self) -> bool:
        return self in (AppendResult.NEW, AppendResult.CONFLICT)


@dataclass(frozen=True)
class Parked:
    event_id: str
    phone_number: str | None
    journaled_at: datetime
    attempts: int
    last_error: str | None
    kind: Literal["store", "sns"]
    """"store": PARKED (the store keeps refusing it); "sns": REFUSED (SNS refused to publish it)."""


# --- operations: each is applied on the journal's thread, inside its batch's transaction -------------
class JournalOp(ABC, Generic[T_co]):
    """One write (psycopg_pool's maintenance-task shape): `apply` does it and returns what its caller awaits."""
    durable: ClassVar[bool] = False
    """Strict mode fsyncs a batch holding one before its callers go on. Marks are not durable: a lost mark
    only repeats an idempotent step."""

    @abstractmethod
    def apply(self, conn: sqlite3.Connection, now: str) -> T_co: ...


@dataclass(frozen=True)
class Append(JournalOp[AppendResult]):
    """A press (the intake): a new row, store PENDING, publish PENDING (NOT_NEEDED when publishing is off)."""
    record: OptOutRecord
    publish: bool
    durable: ClassVar[bool] = True

    def apply(self, conn: sqlite3.Connection, now: str) -> AppendResult:
        rec, publish = self.record, PublishState.PENDING if self.publish else PublishState.NOT_NEEDED
        if conn.execute(
                "INSERT OR IGNORE INTO journal (event_id, record, journaled_at, store_state, publish_state,"
                " phone_number, source_event_id) VALUES (?,?,?,?,?,?,?)", (rec.event_id, rec.to_json(), now,
                StoreState.PENDING.name, publish.name, rec.phone_number, rec.source_event_id)).rowcount == 1:
            if rec.source_event_id and conn.execute(
                    "SELECT 1 FROM journal WHERE source_event_id = ? AND event_id != ? LIMIT 1",
                    (rec.source_event_id, rec.event_id)).fetchone():
                return AppendResult.CONFLICT
            return AppendResult.NEW
        row = conn.execute("SELECT store_state FROM journal WHERE event_id = ?", (rec.event_id,)).fetchone()
        return AppendResult.STORED if row == (StoreState.STORED.name,) else AppendResult.PENDING


@dataclass(frozen=True)
class Replace(JournalOp[None]):
    """A new copy of a record not yet stored (the pipeline, once the hangup is known); no state moves."""
    record: OptOutRecord
    durable: ClassVar[bool] = True

    def apply(self, conn: sqlite3.Connection, now: str) -> None:
        conn.execute(f"UPDATE journal SET record = ? WHERE event_id = ? AND {_UNSTORED}",
                     (self.record.to_json(), self.record.event_id))


@dataclass(frozen=True)
class Mark(JournalOp[None]):
    """Rows moved to `to`: STORED (the pipeline, the replayer), PUBLISHED or REFUSED (the publisher)."""
    event_ids: tuple[str, ...]
    to: StoreState | PublishState

    def apply(self, conn: sqlite3.Connection, now: str) -> None:
        conn.executemany(f"UPDATE journal SET {_is(self.to)} WHERE event_id = ?", [(i,) for i in self.event_ids])


@dataclass(frozen=True)
class Failed(JournalOp[bool]):
    """A failed store attempt (the pipeline, the replayer), counted; the PARK_AFTER-th refusal by the store
    (`rejected`, not a connectivity failure) moves PENDING -> PARKED. Returns whether the row is parked."""
    event_id: str
    error: str
    rejected: bool

    def apply(self, conn: sqlite3.Connection, now: str) -> bool:
        refused = int(self.rejected)
        return conn.execute(
            "UPDATE journal SET attempts = attempts + 1, last_error = ?, refusals = refusals + ?, store_state ="
            f" CASE WHEN {_is(StoreState.PENDING)} AND refusals + ? >= ? THEN {StoreState.PARKED.name!r}"
            " ELSE store_state END WHERE event_id = ? RETURNING store_state",
            (self.error, refused, refused, PARK_AFTER, self.event_id)).fetchall() == [(StoreState.PARKED.name,)]


@dataclass(frozen=True)
class Unpark(JournalOp[int]):
    """Rows given back by an operator (`optout parked --retry`): PARKED -> PENDING, its refusals forgotten,
    and REFUSED -> PENDING, into the outbox again. All of them when `event_ids` is None; returns how many."""
    event_ids: tuple[str, ...] | None

    def apply(self, conn: sqlite3.Connection, now: str) -> int:
        where, params = ("", ()) if self.event_ids is None else (
            f" AND event_id IN ({','.join('?' * len(self.event_ids))})", self.event_ids)
        count = conn.execute(f"UPDATE journal SET {_is(StoreState.PENDING)}, refusals = 0"
                             f" WHERE {_is(StoreState.PARKED)}{where}", params).rowcount
        return count + conn.execute(f"UPDATE journal SET {_is(PublishState.PENDING)}"
                                    f" WHERE {_is(PublishState.REFUSED)}{where}", params).rowcount


@dataclass(frozen=True)
class Restate(JournalOp[int]):
    """After the store went back to a backup (`optout replay --since`): STORED rows journaled since `since`
    -> PENDING, so the replayer writes them again (the store keeps the ones it still has by event id)."""
    since: datetime

    def apply(self, conn: sqlite3.Connection, now: str) -> int:
        return conn.execute(f"UPDATE journal SET {_is(StoreState.PENDING)} WHERE {_is(StoreState.STORED)}"
                            " AND journaled_at >= ?", (self.since.isoformat(),)).rowcount


@dataclass(frozen=True)
class Prune(JournalOp[int]):
    """Retention (the health monitor): forget rows STORED and done with SNS, journaled before `cutoff`."""
    cutoff: datetime

    def apply(self, conn: sqlite3.Connection, now: str) -> int:
        return conn.execute(
            f"DELETE FROM journal WHERE {_is(StoreState.STORED)} AND publish_state IN"
            f" ({PublishState.PUBLISHED.name!r}, {PublishState.NOT_NEEDED.name!r}) AND journaled_at < ?",
            (self.cutoff.isoformat(),)).rowcount


@dataclass(frozen=True)
class Probe(JournalOp[None]):
    """A write that touches no opt-out (the health monitor): does the file still take writes?"""

    def apply(self, conn: sqlite3.Connection, now: str) -> None:
        conn.execute("INSERT OR REPLACE INTO journal_probe (id, at) VALUES (1, ?)", (now,))


class Journal(Resource):
    """An append-only SQLite journal of opt-out records (async context manager)."""

    def __init__(self, path: Path, *, publish: bool = False, sync: JournalSync = "relaxed",
                 max_batch: int = 1000) -> None:
        self.path: Final = path
        self._publish = publish
        self.mode: Final[JournalSync] = sync
        self._db = SqliteDb(path, synchronous="NORMAL", name="journal")
        self._writes: Batcher[JournalOp[object], object] = Batcher(
            self._write, max_batch=max_batch, name="journal-flush")
        self._syncs: Batcher[None, None] = Batcher(self._fsync, max_batch=100_000, name="journal-fsync")
        self._sync_thread: ThreadPoolExecutor | None = None
        self._full = False
        self.healthy = True
        self.last_error: str | None = None

    async def open(self) -> None:
        if self._db.is_open:
            return
        try:
            with self._failing("open"):
                await self._db.open()
                await self._db.run(self._prepare)
        except JournalError:
            await self._db.close()
            raise
        self._sync_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-fsync")
        metrics.JOURNAL_UP.set(1)

    def _prepare(self, conn: sqlite3.Connection) -> None:
        with transaction(conn):
            columns = {r[1] for r in conn.execute("PRAGMA table_info(journal)")}
            if columns and "store_state" not in columns:
                _upgrade(conn, columns)
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        _fsync_path(self.path.parent)  # the WAL file exists now; make its directory entry durable once

    async def close(self) -> None:
        """Write what is queued, then close. Safe to call twice."""
        await self._writes.idle()
        await self._syncs.idle()
        await self._db.close()
        if self._sync_thread is not None:
            self._sync_thread.shutdown(wait=True)
            self._sync_thread = None

    @contextmanager
    def _failing(self, doing: str, *, health: bool = False) -> Iterator[None]:
        """The one translation to JournalError (RuntimeError: closed); a failed write or fsync (`health`) also
        marks the journal failing."""
        try:
            yield
        except (sqlite3.Error, OSError, RuntimeError) as exc:
            if health:
                self._set_health(False, str(exc))
            raise JournalError(f"journal {str(self.path)!r} {doing} failed: {exc}") from exc

    # --- writes: queued and group-committed ---------------------------------------------------------
    async def append(self, record: OptOutRecord) -> AppendResult:
        """Write `record` (durable as the sync mode says). Returns NEW (or CONFLICT), or the state of the
        earlier record with the same event id.

        Raises JournalError when the journal cannot be written: the opt-out was not accepted here.
        """
        return await self._submit(Append(record, self._publish))

    async def sync(self) -> None:
        """Make every append so far survive a power loss (fsync the WAL); nothing to do in strict mode.
        Concurrent callers share one fsync. Raises JournalError."""
        if self.mode == "strict":
            return
        if self._sync_thread is None:
            raise JournalError("journal is closed")
        await self._syncs.submit(None)

    async def mark(self, event_ids: Iterable[str], to: StoreState | PublishState) -> None:
        """Move rows to `to`: STORED, PUBLISHED or REFUSED (each state says who moves it)."""
        await self._submit(Mark(tuple(event_ids), to))

    async def mark_failed(self, event_id: str, error: str, *, rejected: bool = False) -> bool:
        """Count a failed attempt; a record the store refused PARK_AFTER times is parked. True when it is."""
        return await self._submit(Failed(event_id, error[:500], rejected))

    async def replace(self, record: OptOutRecord) -> None:
        """Replace the journaled copy of a record not yet stored (e.g. once the hangup is known)."""
        await self._submit(Replace(record))

    async def unpark(self, event_ids: Sequence[str] | None = None) -> int:
        """Give parked records (all when None) back to the replayer; returns how many."""
        return await self._submit(Unpark(None if event_ids is None else tuple(event_ids)))

    async def restate(self, since: datetime) -> int:
        """Rows stored since `since` given back to the replayer (the store was restored); returns how many."""
        return await self._submit(Restate(since))

    async def probe(self) -> bool:
        """Write a row to see whether the journal can still be written (the health monitor calls it)."""
        try:
            await self._submit(Probe())
        except JournalError:
            return False
        return True

    async def prune(self, older_than: timedelta) -> int:
        """Forget records stored and published longer ago than `older_than`; returns how many."""
        return await self._submit(Prune(datetime.now(UTC) - older_than))

    async def _submit(self, op: JournalOp[T]) -> T:
        if not self._db.is_open:
            raise JournalError("journal is closed")
        return cast(T, await self._writes.submit(op))  # the batcher holds every op; each gets its own result

    async def _write(self, ops: Sequence[JournalOp[object]]) -> list[object]:
        with self._failing("write", health=True):
            results = await self._db.run(self._write_batch, ops)
        self._set_health(True, None)
        return results

    def _set_health(self, healthy: bool, error: str | None) -> None:
        if healthy != self.healthy:
            (log.info if healthy else log.critical)(
                "journal %s is %s", self.path, "writable again" if healthy else f"failing: {error}")
        self.healthy, self.last_error = healthy, error
        metrics.JOURNAL_UP.set(1 if healthy else 0)
        if not healthy:
            metrics.JOURNAL_ERRORS.inc()

    def _write_batch(self, conn: sqlite3.Connection, batch: Sequence[JournalOp[object]]) -> list[object]:
        now = datetime.now(UTC).isoformat()
        full = self.mode == "strict" and any(op.durable for op in batch)
        if full != self._full:
            conn.execute(f"PRAGMA synchronous={'FULL' if full else 'NORMAL'}")
            self._full = full
        with transaction(conn):
            return [op.apply(conn, now) for op in batch]

    async def _fsync(self, items: Sequence[None]) -> list[None]:
        assert self._sync_thread is not None
        with self._failing("fsync", health=True):
            await asyncio.get_running_loop().run_in_executor(self._sync_thread, _fsync_path, f"{self.path}-wal", True)
        return [None] * len(items)

    # --- reads: on the journal's thread, not queued -------------------------------------------------
    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._failing("read"):
            return await self._db.run(fn)

    async def _records(self, where: str, limit: int) -> list[OptOutRecord]:
        rows = await self._read(lambda c: c.execute(f"SELECT record FROM journal WHERE {where}"
                                                    " ORDER BY journaled_at LIMIT ?", (limit,)).fetchall())
        return [OptOutRecord.from_json(r[0]) for r in rows]

    async def unstored(self, limit: int = 500) -> list[OptOutRecord]:
        """Records waiting for the store (PENDING, not PARKED), oldest first: the replayer's work."""
        return await self._records(_is(StoreState.PENDING), limit)

    async def unpublished(self, limit: int = 500) -> list[OptOutRecord]:
        """The SNS outbox (publish PENDING), oldest first; publishing does not wait for the store."""
        return await self._records(_is(PublishState.PENDING), limit)

    async def unstored_numbers(self) -> list[tuple[str, str]]:
        """(event id, number) of every record not in the store yet, parked ones included: they must stay
        visible to the dialers whatever the store holds (re-asserted in Redis every keeper round)."""
        rows = await self._read(lambda c: c.execute(
            f"SELECT event_id, phone_number FROM journal WHERE {_UNSTORED} AND phone_number IS NOT NULL").fetchall())
        return [(str(r[0]), str(r[1])) for r in rows]

    async def holding(self, numbers: Sequence[str]) -> set[str]:
        """Which of `numbers` have an opt-out here that the store may not have yet (parked ones included)."""
        def read(conn: sqlite3.Connection) -> set[str]:
            chunks = (tuple(numbers[i : i + 500]) for i in range(0, len(numbers), 500))
            return {str(r[0]) for chunk in chunks for r in conn.execute(
                f"SELECT DISTINCT phone_number FROM journal WHERE {_UNSTORED} AND phone_number IN"
                f" ({','.join('?' * len(chunk))})", chunk)}
        return await self._read(read)

    async def depth(self) -> int:
        """How many records wait for the store (parked ones included)."""
        row = await self._read(lambda c: c.execute(f"SELECT count(*) FROM journal WHERE {_UNSTORED}").fetchone())
        return int(row[0])

    async def parked(self) -> list[Parked]:
        """Records set aside: PARKED (the store keeps refusing them) or REFUSED (SNS refused to publish them)."""
        rows = await self._read(lambda c: c.execute(
            "SELECT event_id, phone_number, journaled_at, attempts, last_error, store_state FROM journal"
            f" WHERE {_is(StoreState.PARKED)} OR {_is(PublishState.REFUSED)} ORDER BY journaled_at").fetchall())
        return [Parked(r[0], r[1], datetime.fromisoformat(r[2]), r[3], r[4],
                       "store" if r[5] == StoreState.PARKED.name else "sns") for r in rows]
