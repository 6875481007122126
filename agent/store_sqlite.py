"""SQLite store: the same store on an embedded file, so the agent runs with nothing else installed.

Writers serialise on SQLite's own write lock (BEGIN IMMEDIATE), across processes too, so the chain and the
change sequence follow commit order as on PostgreSQL. Timestamps are stored as fixed-width UTC text, so
they sort and compare as text.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from agent import audit
from agent.constants import TABLE_IMPORTS, TABLE_SCHEMA_VERSION, Outcome, Source
from agent.errors import SchemaMissing, StoreRejected, StoreUnavailable
from agent.optout import BlacklistEntry, OptOutRecord
from agent.sqlite_db import SqliteDb, transaction
from agent.store import (
    ACTION_SQL,
    CHANGES_SQL,
    HEAD_SQL,
    REMOVAL_REFUSED_SQL,
    ActionRow,
    Change,
    ImportBatch,
    ImportMark,
    Removal,
    RemoveResult,
    Store,
    StoreResult,
    WritePlan,
    action_filters,
    admin_row,
    chain_head_of,
    change_of,
    import_template,
    metadata_json,
    migrations,
    plan_write,
)

T = TypeVar("T")
_ROW_COLUMNS = audit.ROW_COLUMNS
_INSERT_ACTION = (f"INSERT INTO optout_actions ({', '.join(_ROW_COLUMNS)}) "
                  f"VALUES ({', '.join('?' for _ in _ROW_COLUMNS)})")


def ts(value: datetime | None) -> str | None:
    """Fixed-width UTC text: sorts and compares as the instant does."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00") if value else None


def _values(row: dict[str, Any]) -> list[Any]:
    """The audit row's values in _INSERT_ACTION's order, as SQLite stores them."""
    out = []
    for c in _ROW_COLUMNS:
        value = row.get(c)
        if c in audit.TIMESTAMP_COLUMNS:
            value = ts(value)
        elif c in audit.JSON_COLUMNS and value is not None:
            value = json.dumps(value, separators=(",", ":"))
        out.append(value)
    return out


def _when(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


_TIMES = frozenset({*audit.TIMESTAMP_COLUMNS, "cache_visible_at"})


def _in_chunks(conn: sqlite3.Connection, sql: str, values: Sequence[str]) -> Iterator[Any]:
    """The rows of `sql` whose `IN ({})` takes `values`, 500 at a time (SQLite bounds a statement's parameters)."""
    for i in range(0, len(values), 500):
        chunk = list(values[i : i + 500])
        yield from conn.execute(sql.format(",".join("?" * len(chunk))), chunk)


def _rows(cur: sqlite3.Cursor) -> list[ActionRow]:
    """ACTION_SQL rows as ActionRows: the stored text of timestamps and the channel read back, here only."""
    names = [d[0] for d in cur.description]
    read: list[ActionRow] = []
    for row in cur.fetchall():
        values: dict[str, Any] = dict(zip(names, row, strict=True))
        values.update({n: _when(values[n]) for n in _TIMES}, channel=json.loads(values["channel"] or "null"))
        read.append(ActionRow(**values))
    return read


class SqliteStore(Store):
    """The store on a SQLite file (WAL, synchronous=FULL).

    `create=False` refuses a file that does not exist (a reader pointed at the wrong path gets an error,
    not a new empty store that answers "clear").
    """

    dialect = "sqlite"
    setting = "point OPTOUT_DB_PATH at the agent's store"

    def __init__(self, path: Path, *, create: bool = True) -> None:
        self._db = SqliteDb(path, synchronous="FULL", create=create, name="sqlite-store")
        self.location = f"SQLite {str(path)!r}"

    async def open(self) -> None:
        try:
            await self._db.open()
        except sqlite3.Error as exc:
            raise SchemaMissing(
                f"{self.location} cannot be opened ({exc}): run `optout migrate`, or {self.setting}") from exc

    async def close(self) -> None:
        await self._db.close()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await self._db.run(fn, *args)
        except RuntimeError as exc:
            raise StoreUnavailable(f"{self.location} is closed") from exc
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                raise SchemaMissing(f"{self.location} has no opt-out schema ({exc}); run `optout migrate`") from exc
            raise StoreUnavailable(f"{self.location}: {exc}") from exc
        except (sqlite3.Error, UnicodeError, ValueError, OverflowError) as exc:
            raise StoreRejected(f"{self.location} refused the data: {type(exc).__name__}: {exc}") from exc

    async def _run_tx(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(conn, *args)` in one write transaction (see `transaction`)."""
        def in_tx(conn: sqlite3.Connection, *a: Any) -> T:
            with transaction(conn):
                return fn(conn, *a)

        return await self._run(in_tx, *args)

    async def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return await self._run(lambda c: c.execute(sql.format(m="?"), params).fetchall())

    async def migrate(self) -> list[str]:
        return await self._run_tx(self._migrate)

    def _migrate(self, conn: sqlite3.Connection) -> list[str]:
        applied = []
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
        return applied

    # --- writes --------------------------------------------------------------------------------------------
    @staticmethod
    def _read(conn: sqlite3.Connection, ids: list[str], numbers: list[str]) -> tuple[set[str], set[str], str | None]:
        seen = {r[0] for r in _in_chunks(conn, "SELECT event_id FROM optout_actions WHERE event_id IN ({})", ids)}
        listed = {r[0] for r in _in_chunks(conn, "SELECT phone_number FROM blacklist WHERE phone_number IN ({})",
                                           numbers)}
        return seen, listed, chain_head_of(conn.execute(HEAD_SQL).fetchall())[1]

    @classmethod
    def _append(cls, conn: sqlite3.Connection, row: dict[str, Any]) -> None:
        """Chain `row` to the head and insert it (in the caller's transaction)."""
        audit.chain([row], cls._read(conn, [], [])[2])
        conn.execute(_INSERT_ACTION, _values(row))

    @staticmethod
    def _insert(conn: sqlite3.Connection, plan: WritePlan) -> None:
        conn.executemany(
            "INSERT INTO blacklist (phone_number, added_at, reason, source, metadata) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (phone_number) DO NOTHING",
            [(r.phone_number, ts(r.received_at), r.reason, r.source.value, metadata_json(r)) for r in plan.blacklist],
        )
        conn.executemany(_INSERT_ACTION, [_values(row) for row in plan.actions])
        conn.executemany(
            "INSERT INTO campaign_optouts (campaign_id, optouts, last_optout_at) VALUES (?, ?, ?)"
            " ON CONFLICT (campaign_id) DO UPDATE SET optouts = optouts + excluded.optouts,"
            " last_optout_at = max(coalesce(last_optout_at, ''), excluded.last_optout_at)",
            [(c, n, ts(last)) for c, (n, last) in plan.campaigns.items()],
        )

    async def write(self, records: Sequence[OptOutRecord]) -> list[StoreResult]:
        return await self._run_tx(self._write, list(records))

    def _write(self, conn: sqlite3.Connection, records: list[OptOutRecord]) -> list[StoreResult]:
        seen, listed, head = self._read(conn, [r.event_id for r in records],
                                        [r.phone_number for r in records if r.phone_number])
        plan = plan_write(records, seen_ids=seen, listed=listed, head=head, now=datetime.now(UTC))
        self._insert(conn, plan)
        return plan.results

    async def append_action(self, row: dict[str, Any]) -> None:
        await self._run_tx(self._append, row)

    async def remove(self, removal: Removal) -> RemoveResult:
        return await self._run_tx(self._remove, removal)

    def _remove(self, conn: sqlite3.Connection, removal: Removal) -> RemoveResult:
        if conn.execute(REMOVAL_REFUSED_SQL.format(m="?"), (removal.phone_number, removal.seen_seq)).fetchone():
            return RemoveResult.OPTED_OUT_SINCE
        if conn.execute("DELETE FROM blacklist WHERE phone_number = ?", (removal.phone_number,)).rowcount == 0:
            return RemoveResult.NOT_LISTED
        self._append(conn, admin_row(
            event_id=removal.event_id, phone_number=removal.phone_number, outcome=Outcome.REMOVED, at=removal.at,
            recorded_at=datetime.now(UTC), actor=removal.actor, reason=removal.reason))
        return RemoveResult.REMOVED

    async def import_batch(
        self, numbers: Sequence[str], *, added_at: datetime, reason: str, source: Source, actor: str,
        mark: ImportMark | None = None,
    ) -> ImportBatch:
        return await self._run_tx(self._import, list(numbers), added_at, reason, source, actor, mark)

    def _import(self, conn: sqlite3.Connection, numbers: list[str], added_at: datetime, reason: str,
                source: Source, actor: str, mark: ImportMark | None) -> ImportBatch:
        prefix = f"import-{uuid.uuid4().hex[:12]}-"
        after, head = chain_head_of(conn.execute(HEAD_SQL).fetchall())
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS import_stage (phone_number TEXT)")
        conn.execute("DELETE FROM import_stage")
        conn.executemany("INSERT INTO import_stage (phone_number) VALUES (?)", ((n,) for n in numbers))
        new = [r[0] for r in conn.execute(
            "INSERT INTO blacklist (phone_number, added_at, reason, source)"
            " SELECT DISTINCT phone_number, ?, ?, ? FROM import_stage WHERE TRUE"
            " ON CONFLICT (phone_number) DO NOTHING RETURNING phone_number",
            (ts(added_at), reason, source.value)).fetchall()]
        conn.execute("DELETE FROM import_stage")
        seq = after
        if new:
            template = import_template(at=datetime.now(UTC), actor=actor, reason=reason, source=source)
            rows = audit.chain_uniform(template, ((prefix + n, n) for n in new), head)
            values = _values(template)
            phone_at = _ROW_COLUMNS.index("phone_number")
            conn.executemany(_INSERT_ACTION, (
                (e, *values[1:phone_at], p, *values[phone_at + 1 : -2], prev, h) for e, p, prev, h in rows))
            seq = int(conn.execute("SELECT max(id) FROM optout_actions").fetchone()[0])
        if mark is not None:
            conn.execute(
                f"UPDATE {TABLE_IMPORTS} SET last_line = ?, added = added + ?, bad = bad + ?,"
                " updated_at = strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now') WHERE file_sha256 = ?",
                (mark.last_line, len(new), mark.bad, mark.sha256))
        return ImportBatch(new, after, seq)

    async def import_begin(self, sha256: str, name: str) -> None:
        await self._run_tx(lambda c: c.execute(
            f"INSERT INTO {TABLE_IMPORTS} (file_sha256, file_name) VALUES (?, ?) ON CONFLICT (file_sha256)"
            " DO UPDATE SET file_name = excluded.file_name, last_line = 0, added = 0, bad = 0,"
            " started_at = excluded.started_at, updated_at = excluded.updated_at, finished_at = NULL",
            (sha256, name)))

    async def import_finish(self, sha256: str) -> None:
        await self._run_tx(lambda c: c.execute(
            f"UPDATE {TABLE_IMPORTS} SET finished_at = strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')"
            " WHERE file_sha256 = ?", (sha256,)))

    async def record_visibility(self, seen: Sequence[tuple[str, datetime]]) -> None:
        if seen:
            await self._run_tx(lambda c: c.executemany(
                "INSERT OR IGNORE INTO optout_visibility (event_id, visible_at) VALUES (?, ?)",
                [(event_id, ts(at)) for event_id, at in seen]))

    # --- reads ---------------------------------------------------------------------------------------------
    async def blacklisted(self, numbers: Sequence[str]) -> set[str]:
        return await self._run(lambda c: self._read(c, [], list(numbers))[1])

    async def entries(self, *, batch_size: int = 10_000) -> AsyncIterator[list[BlacklistEntry]]:
        last = ""
        while True:
            rows = await self._run(lambda c, after=last: c.execute(
                "SELECT phone_number, added_at, reason, source, metadata FROM blacklist"
                " WHERE phone_number > ? ORDER BY phone_number LIMIT ?", (after, batch_size)).fetchall())
            if not rows:
                return
            last = rows[-1][0]
            yield [
                BlacklistEntry(phone_number=r[0], added_at=datetime.fromisoformat(r[1]), reason=r[2], source=r[3],
                               metadata=json.loads(r[4]) if r[4] else None)
                for r in rows
            ]

    async def changes(self, after: int, upto: int, *, limit: int = 5000) -> list[Change]:
        rows = await self._query(CHANGES_SQL, (after, upto, limit))
        return [change_of((*r[:3], _when(r[3]), *r[4:9], _when(r[9]), *r[10:])) for r in rows]

    async def stored(self, event_ids: Sequence[str]) -> dict[str, int]:
        if not event_ids:
            return {}
        rows = await self._run(lambda c: list(_in_chunks(
            c, "SELECT event_id, id FROM optout_actions WHERE event_id IN ({})", event_ids)))
        return {str(e): int(n) for e, n in rows}

    async def watch(self, *, every: float = 0.02) -> AsyncIterator[None]:
        """SQLite has no notifications: the head is polled (an index lookup) every `every` seconds, which also
        sees commits of other processes on the same file."""
        last = await self.head()
        while True:
            await asyncio.sleep(every)
            head = await self.head()
            if head != last:
                last = head
                yield

    async def history(self, phone_number: str) -> list[ActionRow]:
        return await self._run(lambda c: _rows(c.execute(
            f"{ACTION_SQL} WHERE a.phone_number = ? ORDER BY a.id", (phone_number,))))

    async def actions(
        self, *, campaign_id: str | None = None, number_prefix: str | None = None,
        since: datetime | None = None, until: datetime | None = None,
    ) -> AsyncIterator[ActionRow]:
        clauses, params = action_filters(campaign_id=campaign_id, number_prefix=number_prefix, since=ts(since),
                                         until=ts(until), mark="?")
        last = 0
        while True:  # pages by id: no read transaction held across the caller's awaits
            page = await self._run(lambda c, after=last: _rows(c.execute(
                f"{ACTION_SQL} WHERE {' AND '.join(['a.id > ?', *clauses])} ORDER BY a.id LIMIT 5000",
                [after, *params])))
            if not page:
                return
            last = page[-1].id
            for row in page:
                yield row


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
