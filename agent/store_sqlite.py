"""SQLite store: the same store on an embedded file, so the agent runs with nothing else installed."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from agent.constants import TABLE_SCHEMA_VERSION, Outcome, Source
from agent.errors import StoreUnavailable
from agent.optout import BlacklistEntry, OptOutRecord
from agent.store import ACTION_COLUMNS, Removal, Store, StoreResult, action_params, migrations

T = TypeVar("T")
_COLS = ", ".join(ACTION_COLUMNS)
_VALS = ", ".join(f":{c}" for c in ACTION_COLUMNS)


def _ts(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value else None


class SqliteStore(Store):
    """The store on a SQLite file (WAL, synchronous=FULL); one connection on one worker thread."""

    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self._path = path
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
            await self._run(self._connect)

    def _connect(self, _: sqlite3.Connection | None = None) -> None:
        conn = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None, timeout=10.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        self._conn = conn

    async def close(self) -> None:
        if self._executor is None:
            return
        executor, self._executor = self._executor, None
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise StoreUnavailable("SQLite store is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, self._conn, *args)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite {str(self._path)!r}: {exc}") from exc

    async def ping(self) -> None:
        await self._run(lambda c: c.execute("SELECT 1"))

    async def migrate(self) -> list[str]:
        return await self._run(self._migrate)

    def _migrate(self, conn: sqlite3.Connection) -> list[str]:
        applied = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {TABLE_SCHEMA_VERSION} (version INTEGER PRIMARY KEY,"
                " name TEXT NOT NULL, applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
            )
            done = {r[0] for r in conn.execute(f"SELECT version FROM {TABLE_SCHEMA_VERSION}")}
            for version, name, sql in migrations(self.dialect):
                if version in done:
                    continue
                for statement in _split_sql(sql):
                    conn.execute(statement)
                conn.execute(f"INSERT INTO {TABLE_SCHEMA_VERSION} (version, name) VALUES (?, ?)", (version, name))
                applied.append(name)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return applied

    async def record(self, records: Sequence[OptOutRecord]) -> list[StoreResult]:
        return await self._run(self._record, list(records))

    def _record(self, conn: sqlite3.Connection, records: list[OptOutRecord]) -> list[StoreResult]:
        results = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for rec in records:
                if conn.execute("SELECT 1 FROM optout_actions WHERE event_id = ?", (rec.event_id,)).fetchone():
                    results.append(StoreResult(rec.event_id, duplicate=True, outcome=None))
                    continue
                outcome = Outcome.NUMBER_UNKNOWN
                if rec.phone_number is not None:
                    meta = rec.metadata()
                    cur = conn.execute(
                        "INSERT INTO blacklist (phone_number, added_at, reason, source, metadata)"
                        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (phone_number) DO NOTHING",
                        (rec.phone_number, _ts(rec.received_at), rec.reason, rec.source.value,
                         json.dumps(meta) if meta else None),
                    )
                    outcome = Outcome.BLACKLISTED if cur.rowcount == 1 else Outcome.ALREADY_BLACKLISTED
                params = action_params(rec)
                for key in ("pressed_at", "received_at", "hangup_requested_at", "hungup_at"):
                    params[key] = _ts(params[key])
                params["outcome"] = outcome.value
                conn.execute(f"INSERT INTO optout_actions ({_COLS}, outcome) VALUES ({_VALS}, :outcome)", params)
                if rec.campaign_id is not None:
                    conn.execute(
                        "INSERT INTO campaign_optouts (campaign_id, optouts, last_optout_at) VALUES (?, 1, ?)"
                        " ON CONFLICT (campaign_id) DO UPDATE SET optouts = optouts + 1,"
                        " last_optout_at = max(coalesce(last_optout_at, ''), excluded.last_optout_at)",
                        (rec.campaign_id, _ts(rec.received_at)),
                    )
                results.append(StoreResult(rec.event_id, duplicate=False, outcome=outcome))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return results

    async def remove(self, removal: Removal) -> bool:
        return await self._run(self._remove, removal)

    def _remove(self, conn: sqlite3.Connection, removal: Removal) -> bool:
        conn.execute("BEGIN IMMEDIATE")
        try:
            cur = conn.execute("DELETE FROM blacklist WHERE phone_number = ?", (removal.phone_number,))
            if cur.rowcount == 0:
                conn.execute("ROLLBACK")
                return False
            conn.execute(
                "INSERT INTO optout_actions (event_id, phone_number, origin, received_at, outcome, actor, reason)"
                " VALUES (?, ?, 'admin', ?, ?, ?, ?)",
                (removal.event_id, removal.phone_number, _ts(removal.at), Outcome.REMOVED.value, removal.actor,
                 removal.reason),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return True

    async def blacklisted(self, numbers: Sequence[str]) -> set[str]:
        return await self._run(self._blacklisted, list(numbers))

    @staticmethod
    def _blacklisted(conn: sqlite3.Connection, numbers: list[str]) -> set[str]:
        found: set[str] = set()
        for i in range(0, len(numbers), 500):
            chunk = numbers[i : i + 500]
            marks = ",".join("?" * len(chunk))
            found.update(
                r[0] for r in conn.execute(f"SELECT phone_number FROM blacklist WHERE phone_number IN ({marks})", chunk)
            )
        return found

    async def entries(
        self, *, batch_size: int = 10_000, since: datetime | None = None
    ) -> AsyncIterator[list[BlacklistEntry]]:
        last = ""
        while True:
            rows = await self._run(self._entries_page, last, batch_size, _ts(since))
            if not rows:
                return
            last = rows[-1][0]
            yield [
                BlacklistEntry(
                    phone_number=r[0], added_at=datetime.fromisoformat(r[1]), reason=r[2], source=r[3],
                    metadata=json.loads(r[4]) if r[4] else None,
                )
                for r in rows
            ]

    @staticmethod
    def _entries_page(conn: sqlite3.Connection, after: str, limit: int, since: str | None) -> list[Any]:
        return conn.execute(
            "SELECT phone_number, added_at, reason, source, metadata FROM blacklist"
            " WHERE phone_number > ? AND (? IS NULL OR phone_number IN"
            " (SELECT phone_number FROM optout_actions WHERE recorded_at >= ?)) ORDER BY phone_number LIMIT ?",
            (after, since, since, limit),
        ).fetchall()

    async def import_numbers(
        self, numbers: Sequence[str], *, added_at: datetime, reason: str, source: Source, actor: str
    ) -> int:
        return await self._run(self._import, list(numbers), _ts(added_at), reason, source.value, actor)

    @staticmethod
    def _import(conn: sqlite3.Connection, numbers: list[str], added_at: str, reason: str, source: str,
                actor: str) -> int:
        prefix = f"import-{uuid.uuid4().hex[:12]}-"
        now = _ts(datetime.now(UTC))
        new = 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            for number in numbers:
                cur = conn.execute(
                    "INSERT INTO blacklist (phone_number, added_at, reason, source) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (phone_number) DO NOTHING",
                    (number, added_at, reason, source),
                )
                if cur.rowcount == 1:
                    new += 1
                    conn.execute(
                        "INSERT INTO optout_actions (event_id, phone_number, origin, source, received_at, outcome,"
                        " actor, reason) VALUES (?, ?, 'admin', ?, ?, 'blacklisted', ?, ?)",
                        (prefix + number, number, source, now, actor, reason),
                    )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return new

    async def history(self, phone_number: str) -> list[dict[str, Any]]:
        return await self._run(self._select_actions, "phone_number = ?", [phone_number])

    @staticmethod
    def _select_actions(conn: sqlite3.Connection, where: str, params: list[Any]) -> list[dict[str, Any]]:
        cur = conn.execute(f"SELECT * FROM optout_actions WHERE {where} ORDER BY id", params)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    async def actions(
        self, *, campaign_id: str | None = None, number_prefix: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        clauses: list[str] = ["1 = 1"]
        params: list[Any] = []
        if campaign_id is not None:
            clauses.append("campaign_id = ?")
            params.append(campaign_id)
        if number_prefix is not None:
            clauses.append("substr(phone_number, 1, ?) = ?")
            params += [len(number_prefix), number_prefix]
        for row in await self._run(self._select_actions, " AND ".join(clauses), params):
            yield row

    async def campaign_count(self, campaign_id: str) -> int:
        rows = await self._run(
            lambda c: c.execute("SELECT optouts FROM campaign_optouts WHERE campaign_id = ?", (campaign_id,)).fetchall()
        )
        return int(rows[0][0]) if rows else 0


def _split_sql(script: str) -> list[str]:
    """Split a migration into statements, keeping trigger bodies (BEGIN ... END;) whole."""
    statements, buf = [], ""
    for line in script.splitlines(keepends=True):
        if line.lstrip().startswith("--"):
            continue
        buf += line
        if sqlite3.complete_statement(buf):
            statements.append(buf.strip())
            buf = ""
    if buf.strip():
        statements.append(buf.strip())
    return statements
