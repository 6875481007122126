"""The local durable journal: every opt-out is written here before the call is ended.

SQLite in WAL mode. Two ways to be durable (`OPTOUT_JOURNAL_SYNC`):
- `relaxed` (default): an append commits with `synchronous=NORMAL`, so it is in the operating system's page
  cache when the call is ended: it survives a crash of the agent (SIGKILL included), not a power loss of
  the machine. `sync()` then fsyncs the WAL, on a thread of its own, right after the hangup request is
  out and before the store step. The only window left is a power loss within that fsync, which also drops
  the call.
- `strict`: every batch holding an append commits with `synchronous=FULL`, i.e. is fsynced before the call
  is ended; `sync()` has nothing left to do.
Appends are group-committed (agent/batching.py): what arrives while one batch is written goes in the next.

The journal is also the outbox: a row stays until it is stored in the system of record and (when
publishing is on) published to SNS; the replayer and the publisher work from it across restarts. A row
the store keeps refusing is parked (it stays, is counted and listed, and blocks nothing), and rows stored
and published are pruned after the retention period.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from agent import metrics
from agent.batching import Batcher
from agent.errors import JournalError
from agent.lifecycle import Resource
from agent.optout import OptOutRecord
from agent.sqlite_db import SqliteDb, transaction

log = logging.getLogger("agent.journal")

JournalSync = Literal["relaxed", "strict"]
PARK_AFTER = 3
"""Refusals by the store (not connectivity failures) after which a record is parked."""
_SCHEMA_VERSION = 3
_SCHEMA = """
CREATE TABLE IF NOT EXISTS journal (
    event_id        TEXT PRIMARY KEY,
    record          TEXT NOT NULL,
    journaled_at    TEXT NOT NULL,
    stored          INTEGER NOT NULL DEFAULT 0,
    published       INTEGER NOT NULL DEFAULT 0,
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    parked          INTEGER NOT NULL DEFAULT 0,
    refusals        INTEGER NOT NULL DEFAULT 0,
    phone_number    TEXT,
    source_event_id TEXT
);
CREATE INDEX IF NOT EXISTS journal_unstored ON journal (stored) WHERE stored = 0;
CREATE INDEX IF NOT EXISTS journal_unpublished ON journal (published) WHERE published = 0;
CREATE INDEX IF NOT EXISTS journal_source ON journal (source_event_id) WHERE source_event_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS journal_unstored_number ON journal (phone_number) WHERE stored = 0;
CREATE TABLE IF NOT EXISTS journal_probe (id INTEGER PRIMARY KEY, at TEXT NOT NULL);
"""
_UPGRADE_1 = ("ALTER TABLE journal ADD COLUMN parked INTEGER NOT NULL DEFAULT 0",
              "ALTER TABLE journal ADD COLUMN refusals INTEGER NOT NULL DEFAULT 0",
              "ALTER TABLE journal ADD COLUMN phone_number TEXT",
              "ALTER TABLE journal ADD COLUMN source_event_id TEXT")


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
    journaled_at: str
    attempts: int
    last_error: str | None
    kind: str
    """"store" (the store keeps refusing it) or "sns" (SNS refused to publish it)."""


@dataclass(frozen=True)
class _Op:
    kind: str
    args: Any


class Journal(Resource):
    """An append-only SQLite journal of opt-out records (async context manager)."""

    def __init__(self, path: Path, *, publish: bool = False, sync: JournalSync = "relaxed",
                 max_batch: int = 1000) -> None:
        self._path = path
        self._publish = publish
        self._mode = sync
        self._db = SqliteDb(path, synchronous="NORMAL", name="journal")
        self._writes: Batcher[_Op, Any] = Batcher(self._write, max_batch=max_batch, name="journal-flush")
        self._syncs: Batcher[None, None] = Batcher(self._fsync, max_batch=100_000, name="journal-fsync")
        self._sync_thread: ThreadPoolExecutor | None = None
        self._full = False
        self.healthy = True
        self.last_error: str | None = None

    @property
    def path(self) -> Path:
        return self._path

    @property
    def mode(self) -> JournalSync:
        return self._mode

    async def open(self) -> None:
        if self._db.is_open:
            return
        try:
            await self._db.open()
            await self._db.run(self._prepare)
        except (sqlite3.Error, OSError) as exc:
            await self._db.close()
            raise JournalError(f"cannot open journal {str(self._path)!r}: {exc}") from exc
        self._sync_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-fsync")
        metrics.JOURNAL_UP.set(1)

    def _prepare(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        exists = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'journal'").fetchone()
        with transaction(conn):
            if exists and version < 2:
                columns = {r[1] for r in conn.execute("PRAGMA table_info(journal)")}
                for statement in _UPGRADE_1:
                    if statement.split()[5] not in columns:
                        conn.execute(statement)
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        # The WAL file exists now; make its directory entry durable once.
        fd = os.open(self._path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    async def close(self) -> None:
        """Write what is queued, then close. Safe to call twice."""
        await self._writes.idle()
        await self._syncs.idle()
        await self._db.close()
        if self._sync_thread is not None:
            self._sync_thread.shutdown(wait=True)
            self._sync_thread = None

    # --- writes: queued and group-committed ---------------------------------------------------------
    async def append(self, record: OptOutRecord) -> AppendResult:
        """Write `record` (durable as the sync mode says). Returns NEW (or CONFLICT), or the state of the
        earlier record with the same event id.

        Raises JournalError when the journal cannot be written: the opt-out was not accepted here.
        """
        text = record.to_json()
        result: AppendResult = await self._submit("append", (record, text))
        return result

    async def sync(self) -> None:
        """Make every append so far survive a power loss (fsync the WAL); nothing to do in strict mode.
        Concurrent callers share one fsync. Raises JournalError."""
        if self._mode == "strict":
            return
        if self._sync_thread is None:
            raise JournalError("journal is closed")
        await self._syncs.submit(None)

    async def mark_stored(self, event_ids: Iterable[str]) -> None:
        await self._submit("stored", list(event_ids))

    async def mark_published(self, event_ids: Iterable[str]) -> None:
        await self._submit("published", list(event_ids))

    async def mark_publish_refused(self, event_ids: Iterable[str]) -> None:
        """SNS refused these for good: out of the outbox, kept and listed (`parked`) for a person to look at."""
        await self._submit("publish_refused", list(event_ids))

    async def mark_failed(self, event_id: str, error: str, *, rejected: bool = False) -> bool:
        """Count a failed attempt; a record the store refused PARK_AFTER times is parked. True when it is."""
        parked: bool = await self._submit("failed", (event_id, error[:500], rejected))
        return parked

    async def replace(self, record: OptOutRecord) -> None:
        """Replace the journaled copy of a record not yet stored (e.g. once the hangup is known)."""
        await self._submit("replace", (record, record.to_json()))

    async def unpark(self, event_ids: Sequence[str] | None = None) -> int:
        """Give parked records (all when None) back to the replayer; returns how many."""
        count: int = await self._submit("unpark", list(event_ids) if event_ids is not None else None)
        return count

    async def probe(self) -> bool:
        """Write a row to see whether the journal can still be written (the health monitor calls it)."""
        try:
            await self._submit("probe", None)
        except JournalError:
            return False
        return True

    async def _submit(self, kind: str, args: Any) -> Any:
        if not self._db.is_open:
            raise JournalError("journal is closed")
        return await self._writes.submit(_Op(kind, args))

    async def _write(self, ops: Sequence[_Op]) -> list[Any]:
        try:
            results: list[Any] = await self._db.run(self._write_batch, ops)
        except (sqlite3.Error, OSError, RuntimeError) as exc:
            self._set_health(False, str(exc))
            raise JournalError(f"journal {str(self._path)!r} write failed: {exc}") from exc
        self._set_health(True, None)
        return results

    def _set_health(self, healthy: bool, error: str | None) -> None:
        if healthy != self.healthy:
            (log.info if healthy else log.critical)(
                "journal %s is %s", self._path, "writable again" if healthy else f"failing: {error}")
        self.healthy, self.last_error = healthy, error
        metrics.JOURNAL_UP.set(1 if healthy else 0)
        if not healthy:
            metrics.JOURNAL_ERRORS.inc()

    def _write_batch(self, conn: sqlite3.Connection, batch: Sequence[_Op]) -> list[Any]:
        now = datetime.now(UTC).isoformat()
        # Strict: a batch holding appends (or replacements) is fsynced before its callers go on; marks
        # ("stored", "published") never are: a lost mark only repeats an idempotent step.
        full = self._mode == "strict" and any(op.kind in ("append", "replace") for op in batch)
        if full != self._full:
            conn.execute(f"PRAGMA synchronous={'FULL' if full else 'NORMAL'}")
            self._full = full
        with transaction(conn):
            return [self._apply(conn, op, now) for op in batch]

    def _apply(self, conn: sqlite3.Connection, op: _Op, now: str) -> Any:
        if op.kind == "append":
            rec, text = op.args
            cur = conn.execute(
                "INSERT OR IGNORE INTO journal (event_id, record, journaled_at, published, phone_number,"
                " source_event_id) VALUES (?,?,?,?,?,?)",
                (rec.event_id, text, now, 0 if self._publish else 1, rec.phone_number, rec.source_event_id),
            )
            if cur.rowcount == 1:
                if rec.source_event_id and conn.execute(
                        "SELECT 1 FROM journal WHERE source_event_id = ? AND event_id != ? LIMIT 1",
                        (rec.source_event_id, rec.event_id)).fetchone():
                    return AppendResult.CONFLICT
                return AppendResult.NEW
            row = conn.execute("SELECT stored FROM journal WHERE event_id = ?", (rec.event_id,)).fetchone()
            return AppendResult.STORED if row and row[0] else AppendResult.PENDING
        if op.kind in ("stored", "published"):
            conn.executemany(f"UPDATE journal SET {op.kind} = 1 WHERE event_id = ?", [(i,) for i in op.args])
        elif op.kind == "publish_refused":
            conn.executemany("UPDATE journal SET published = 2 WHERE event_id = ?", [(i,) for i in op.args])
        elif op.kind == "failed":
            event_id, error, rejected = op.args
            conn.execute(
                "UPDATE journal SET attempts = attempts + 1, last_error = ?, refusals = refusals + ?,"
                " parked = CASE WHEN refusals + ? >= ? THEN 1 ELSE parked END WHERE event_id = ?",
                (error, int(rejected), int(rejected), PARK_AFTER, event_id),
            )
            row = conn.execute("SELECT parked FROM journal WHERE event_id = ?", (event_id,)).fetchone()
            return bool(row and row[0])
        elif op.kind == "replace":
            rec, text = op.args
            conn.execute("UPDATE journal SET record = ? WHERE event_id = ? AND stored = 0", (text, rec.event_id))
        elif op.kind == "unpark":
            where, params = ("", ()) if op.args is None else (
                f" AND event_id IN ({','.join('?' * len(op.args))})", tuple(op.args))
            count: int = conn.execute(f"UPDATE journal SET parked = 0, refusals = 0 WHERE parked = 1{where}",
                                      params).rowcount
            return count + conn.execute(f"UPDATE journal SET published = 0 WHERE published = 2{where}",
                                        params).rowcount
        elif op.kind == "probe":
            conn.execute("INSERT OR REPLACE INTO journal_probe (id, at) VALUES (1, ?)", (now,))
        else:  # pragma: no cover - programming error
            raise ValueError(op.kind)
        return None

    async def _fsync(self, items: Sequence[None]) -> list[None]:
        assert self._sync_thread is not None
        try:
            await asyncio.get_running_loop().run_in_executor(self._sync_thread, self._fsync_wal)
        except OSError as exc:
            self._set_health(False, str(exc))
            raise JournalError(f"journal {str(self._path)!r} fsync failed: {exc}") from exc
        return [None] * len(items)

    def _fsync_wal(self) -> None:
        wal = f"{self._path}-wal"
        try:
            fd = os.open(wal, os.O_RDONLY)
        except FileNotFoundError:
            return  # checkpointed away: what it held is in the database file, synced by the checkpoint
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- reads --------------------------------------------------------------------------------------
    async def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            return await self._db.run(lambda c: c.execute(sql, params).fetchall())
        except (sqlite3.Error, RuntimeError) as exc:
            raise JournalError(f"journal {str(self._path)!r} read failed: {exc}") from exc

    async def unstored(self, limit: int = 500) -> list[OptOutRecord]:
        """Records not yet in the store and not parked, oldest first."""
        rows = await self._query(
            "SELECT record FROM journal WHERE stored = 0 AND parked = 0 ORDER BY journaled_at LIMIT ?", (limit,))
        return [OptOutRecord.from_json(r[0]) for r in rows]

    async def unpublished(self, limit: int = 500) -> list[OptOutRecord]:
        """Records not yet published (the SNS outbox), oldest first; publishing does not wait for the store."""
        rows = await self._query(
            "SELECT record FROM journal WHERE published = 0 ORDER BY journaled_at LIMIT ?", (limit,))
        return [OptOutRecord.from_json(r[0]) for r in rows]

    async def unstored_numbers(self) -> list[tuple[str, str]]:
        """(event id, number) of every record not in the store yet, parked ones included: they must stay
        visible to the dialers whatever the store holds (re-asserted in Redis every keeper round)."""
        rows = await self._query(
            "SELECT event_id, phone_number FROM journal WHERE stored = 0 AND phone_number IS NOT NULL")
        return [(str(r[0]), str(r[1])) for r in rows]

    async def holding(self, numbers: Sequence[str]) -> set[str]:
        """Which of `numbers` have an opt-out here that the store may not have yet (parked ones included)."""
        found: set[str] = set()
        for i in range(0, len(numbers), 500):
            chunk = tuple(numbers[i : i + 500])
            rows = await self._query(
                f"SELECT DISTINCT phone_number FROM journal WHERE stored = 0 AND phone_number IN"
                f" ({','.join('?' * len(chunk))})", chunk)
            found.update(str(r[0]) for r in rows)
        return found

    async def depth(self) -> int:
        """How many records wait for the store (parked ones included)."""
        rows = await self._query("SELECT count(*) FROM journal WHERE stored = 0")
        return int(rows[0][0])

    async def parked(self) -> list[Parked]:
        """Records set aside: the store keeps refusing them, or SNS refused to publish them."""
        rows = await self._query(
            "SELECT event_id, phone_number, journaled_at, attempts, last_error,"
            " CASE WHEN parked = 1 AND stored = 0 THEN 'store' ELSE 'sns' END FROM journal"
            " WHERE (parked = 1 AND stored = 0) OR published = 2 ORDER BY journaled_at")
        return [Parked(str(r[0]), r[1], str(r[2]), int(r[3]), r[4], str(r[5])) for r in rows]

    async def prune(self, older_than: timedelta) -> int:
        """Forget records stored and published longer ago than `older_than`; returns how many."""
        cutoff = (datetime.now(UTC) - older_than).isoformat()

        def delete(conn: sqlite3.Connection) -> int:
            with transaction(conn):
                return conn.execute(
                    "DELETE FROM journal WHERE stored = 1 AND published = 1 AND journaled_at < ?", (cutoff,)
                ).rowcount

        try:
            return await self._db.run(delete)
        except (sqlite3.Error, RuntimeError) as exc:
            raise JournalError(f"journal {str(self._path)!r} prune failed: {exc}") from exc
