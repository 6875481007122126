"""The local durable journal: every opt-out is fsynced here before anything else can fail.

SQLite in WAL mode with `synchronous=FULL`: a commit returns only once the WAL is on disk. Appends are
group-committed: while one batch is being written, new appends queue up and go in the next transaction,
so throughput grows with load while each caller still waits for its own fsync.

The journal is also the outbox: a row stays until it is stored in the system of record and (when
publishing is on) published to SNS; the replayer and the publisher work from it across restarts.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any

from agent.errors import JournalError
from agent.lifecycle import Resource
from agent.optout import OptOutRecord

_SCHEMA = """
CREATE TABLE IF NOT EXISTS journal (
    event_id     TEXT PRIMARY KEY,
    record       TEXT NOT NULL,
    journaled_at TEXT NOT NULL,
    stored       INTEGER NOT NULL DEFAULT 0,
    published    INTEGER NOT NULL DEFAULT 0,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT
);
CREATE INDEX IF NOT EXISTS journal_unstored ON journal (stored) WHERE stored = 0;
CREATE INDEX IF NOT EXISTS journal_unpublished ON journal (published) WHERE published = 0;
"""


class AppendResult(Enum):
    NEW = "new"
    """First time this event id is seen."""
    PENDING = "pending"
    """Seen before and not yet in the store (being processed, or waiting for the replayer)."""
    STORED = "stored"
    """Seen before and already in the store."""


@dataclass
class _Op:
    kind: str
    args: Any
    future: asyncio.Future[Any] = field(repr=False)


class Journal(Resource):
    """An append-only, fsynced SQLite journal of opt-out records (async context manager)."""

    def __init__(self, path: Path, *, publish: bool = False, max_batch: int = 1000) -> None:
        self._path = path
        self._publish = publish
        self._max_batch = max_batch
        self._ops: list[_Op] = []
        self._flusher: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._synced = True

    @property
    def path(self) -> Path:
        return self._path

    async def open(self) -> None:
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal")
        try:
            await self._run(self._open_sync)
        except (sqlite3.Error, OSError) as exc:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise JournalError(f"cannot open journal {str(self._path)!r}: {exc}") from exc

    def _open_sync(self) -> None:
        if self._path.parent and not self._path.parent.exists():
            self._path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None, timeout=10.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
        self._conn = conn

    async def close(self) -> None:
        """Flush what is queued, then close. Safe to call twice."""
        if self._executor is None:
            return
        if self._flusher is not None:
            # The waiting callers got any error already.
            await asyncio.gather(self._flusher, return_exceptions=True)
        executor, self._executor = self._executor, None
        await asyncio.get_running_loop().run_in_executor(executor, self._close_sync)
        executor.shutdown(wait=True)

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # --- writes: queued and group-committed ---------------------------------------------------------
    async def append(self, record: OptOutRecord) -> AppendResult:
        """Make `record` durable. Returns NEW, or the state of the earlier record with the same event id.

        Raises JournalError when the journal cannot be written: the opt-out was not accepted.
        """
        result: AppendResult = await self._submit("append", record)
        return result

    async def mark_stored(self, event_ids: Iterable[str]) -> None:
        await self._submit("stored", list(event_ids))

    async def mark_published(self, event_ids: Iterable[str]) -> None:
        await self._submit("published", list(event_ids))

    async def mark_failed(self, event_id: str, error: str) -> None:
        await self._submit("failed", (event_id, error[:500]))

    async def replace(self, record: OptOutRecord) -> None:
        """Replace the journaled copy of a record not yet stored (e.g. once the hangup is known)."""
        await self._submit("replace", record)

    def _submit(self, kind: str, args: Any) -> asyncio.Future[Any]:
        if self._executor is None:
            raise JournalError("journal is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._ops.append(_Op(kind, args, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush(), name="journal-flush")
        return fut

    async def _flush(self) -> None:
        while self._ops:
            batch, self._ops = self._ops[: self._max_batch], self._ops[self._max_batch :]
            try:
                results = await self._run(self._write_batch, batch)
            except Exception as exc:  # noqa: BLE001 - every waiting caller gets it as a JournalError
                err = JournalError(f"journal {str(self._path)!r} write failed: {exc}")
                for op in batch:
                    if not op.future.done():
                        op.future.set_exception(err)
                continue
            for op, res in zip(batch, results, strict=True):
                if not op.future.done():
                    op.future.set_result(res)

    def _write_batch(self, batch: Sequence[_Op]) -> list[Any]:
        conn = self._require()
        now = datetime.now(UTC).isoformat()
        results: list[Any] = []
        # Only appends (and replacements) must be on disk before the caller goes on; a lost "stored" or
        # "published" mark merely makes the replayer or publisher do an idempotent step again. So a batch
        # without them commits without waiting for fsync, and the appends queued behind it wait less.
        durable = any(op.kind in ("append", "replace") for op in batch)
        with self._lock:
            if durable != self._synced:
                conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                self._synced = durable
            conn.execute("BEGIN IMMEDIATE")
            try:
                for op in batch:
                    results.append(self._apply(conn, op, now))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return results

    def _apply(self, conn: sqlite3.Connection, op: _Op, now: str) -> Any:
        if op.kind == "append":
            rec: OptOutRecord = op.args
            cur = conn.execute(
                "INSERT OR IGNORE INTO journal (event_id, record, journaled_at, published) VALUES (?,?,?,?)",
                (rec.event_id, rec.to_json(), now, 0 if self._publish else 1),
            )
            if cur.rowcount == 1:
                return AppendResult.NEW
            row = conn.execute("SELECT stored FROM journal WHERE event_id = ?", (rec.event_id,)).fetchone()
            return AppendResult.STORED if row and row[0] else AppendResult.PENDING
        if op.kind == "stored":
            conn.executemany("UPDATE journal SET stored = 1 WHERE event_id = ?", [(i,) for i in op.args])
        elif op.kind == "published":
            conn.executemany("UPDATE journal SET published = 1 WHERE event_id = ?", [(i,) for i in op.args])
        elif op.kind == "failed":
            conn.execute(
                "UPDATE journal SET attempts = attempts + 1, last_error = ? WHERE event_id = ?",
                (op.args[1], op.args[0]),
            )
        elif op.kind == "replace":
            rec = op.args
            conn.execute(
                "UPDATE journal SET record = ? WHERE event_id = ? AND stored = 0", (rec.to_json(), rec.event_id)
            )
        else:  # pragma: no cover - programming error
            raise ValueError(op.kind)
        return None

    # --- reads --------------------------------------------------------------------------------------
    async def unstored(self, limit: int = 500) -> list[OptOutRecord]:
        """Records not yet in the store, oldest first."""
        rows = await self._run(
            self._query,
            "SELECT record FROM journal WHERE stored = 0 ORDER BY journaled_at LIMIT ?",
            (limit,),
        )
        return [OptOutRecord.from_json(r[0]) for r in rows]

    async def unpublished(self, limit: int = 500) -> list[OptOutRecord]:
        """Records not yet published (the SNS outbox), oldest first; publishing does not wait for the store."""
        rows = await self._run(
            self._query,
            "SELECT record FROM journal WHERE published = 0 ORDER BY journaled_at LIMIT ?",
            (limit,),
        )
        return [OptOutRecord.from_json(r[0]) for r in rows]

    async def depth(self) -> int:
        """How many records wait for the store."""
        rows = await self._run(self._query, "SELECT count(*) FROM journal WHERE stored = 0", ())
        return int(rows[0][0])

    async def prune(self, older_than: timedelta) -> int:
        """Forget records stored and published longer ago than `older_than`; returns how many."""
        cutoff = (datetime.now(UTC) - older_than).isoformat()
        return int(await self._run(self._prune_sync, cutoff))

    def _prune_sync(self, cutoff: str) -> int:
        conn = self._require()
        with self._lock:
            cur = conn.execute(
                "DELETE FROM journal WHERE stored = 1 AND published = 1 AND journaled_at < ?", (cutoff,)
            )
            return cur.rowcount

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._require().execute(sql, params).fetchall()

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise JournalError("journal is not open")
        return self._conn

    async def _run(self, fn: Any, *args: Any) -> Any:
        if self._executor is None:
            raise JournalError("journal is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
