"""PostgreSQL store (the system of record), on psycopg 3 with an async connection pool.

Every write of the audit trail takes one advisory transaction lock (`CHAIN_LOCK`): the hash chain is
extended in commit order, and the audit row id doubles as the blacklist's change sequence (a reader that
sees row N committed sees every row before it).
"""

from __future__ import annotations

import asyncio
import json
import struct
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from itertools import islice
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from agent import audit
from agent.constants import CHAIN_LOCK, CHANGE_NOTIFY_CHANNEL, TABLE_IMPORTS, TABLE_SCHEMA_VERSION, Outcome, Source
from agent.errors import SchemaMissing, StoreRejected, StoreUnavailable
from agent.optout import BlacklistEntry, OptOutRecord
from agent.store import (
    ACTION_SQL,
    ACTIONS_FROM,
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

_MIGRATION_LOCK = 0x0F7_0A7  # pg_advisory_xact_lock key: one migrator at a time
_ROW_COLUMNS = audit.ROW_COLUMNS
_INSERT_ACTION = (f"INSERT INTO optout_actions ({', '.join(_ROW_COLUMNS)}) "
                  f"VALUES ({', '.join(f'%({c})s' for c in _ROW_COLUMNS)})")


def _array(column: str) -> str:
    kind = "timestamptz" if column in audit.TIMESTAMP_COLUMNS else "text"
    return f"%(a_{column})s::{kind}[]"


_INSERT_ALL = f"""
WITH bl AS (
    INSERT INTO blacklist (phone_number, added_at, reason, source, metadata)
    SELECT p, a, r, s, m::jsonb FROM unnest(%(b_phone)s::text[], %(b_added)s::timestamptz[], %(b_reason)s::text[],
                                           %(b_source)s::text[], %(b_meta)s::text[]) AS t(p, a, r, s, m)
    ON CONFLICT (phone_number) DO NOTHING
), act AS (
    INSERT INTO optout_actions ({', '.join(_ROW_COLUMNS)})
    SELECT {', '.join(f"{c}::jsonb" if c in audit.JSON_COLUMNS else c for c in _ROW_COLUMNS)}
    FROM unnest({', '.join(_array(c) for c in _ROW_COLUMNS)}) WITH ORDINALITY AS t({', '.join(_ROW_COLUMNS)}, n)
    ORDER BY n
), cc AS (
    INSERT INTO campaign_optouts (campaign_id, optouts, last_optout_at)
    SELECT * FROM unnest(%(c_id)s::text[], %(c_count)s::bigint[], %(c_last)s::timestamptz[])
    ON CONFLICT (campaign_id) DO UPDATE SET optouts = campaign_optouts.optouts + EXCLUDED.optouts,
        last_optout_at = GREATEST(campaign_optouts.last_optout_at, EXCLUDED.last_optout_at)
)
SELECT 1
"""
# Connectivity, timeouts and server trouble: the batch can be retried as it is.
_TRANSIENT = (psycopg.OperationalError, psycopg.InterfaceError, psycopg.errors.LockNotAvailable,
              psycopg.errors.QueryCanceled, psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected)


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    """Session limits on every new connection: a stuck lock or statement fails fast and the opt-out goes
    to the journal replayer, instead of stalling every write behind it."""
    async with conn.transaction():
        await conn.execute(
            "SET statement_timeout = '5s'; SET lock_timeout = '2s'; SET idle_in_transaction_session_timeout = '10s'"
        )


_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
_INT32 = struct.Struct("!i")


def _binary_field(column: str, value: Any) -> bytes:
    """One field of COPY's binary format (length, then the value in the type's binary form): timestamps need
    no parsing on the server, which makes an import's audit rows markedly cheaper to load than text."""
    if value is None:
        return _INT32.pack(-1)
    if column in audit.TIMESTAMP_COLUMNS:
        delta = value - _PG_EPOCH
        return struct.pack("!iq", 8, (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds)
    data = (b"\x01" + json.dumps(value, separators=(",", ":")).encode()) if column in audit.JSON_COLUMNS \
        else str(value).encode()
    return _INT32.pack(len(data)) + data


def _binary_rows(template: dict[str, Any], rows: Iterator[tuple[str, str, str, str]]) -> Iterator[bytes]:
    """Audit rows of an import as binary COPY data, built from the template's fields once; only the event id,
    number and hashes differ between rows."""
    fields = [_binary_field(c, template.get(c)) for c in _ROW_COLUMNS]
    start = struct.pack("!h", len(_ROW_COLUMNS))
    between, after_phone, hash_len = fields[1], b"".join(fields[3:-2]), _INT32.pack(64)
    pack = _INT32.pack
    yield _COPY_HEADER
    while chunk := list(islice(rows, 5000)):
        yield b"".join(b"".join((start, pack(len(e)), e.encode(), between, pack(len(p)), p.encode(), after_phone,
                                 hash_len, prev.encode(), hash_len, h.encode())) for e, p, prev, h in chunk)
    yield b"\xff\xff"


def _iso_sql(column: str) -> str:
    """SQL text of a timestamptz column as Python's isoformat() of it in UTC (what the exports always wrote)."""
    return (f"CASE WHEN {column} IS NULL THEN NULL WHEN date_trunc('second', {column}) = {column}"
            f" THEN to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"+00:00\"')"
            f" ELSE to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"') END")


def _action_params(row: dict[str, Any]) -> dict[str, Any]:
    params = {c: row.get(c) for c in _ROW_COLUMNS}
    params["channel"] = Jsonb(row["channel"]) if row.get("channel") is not None else None
    return params


class PostgresStore(Store):
    """The store on PostgreSQL. `conninfo` is a libpq URL; credentials come from it (the environment)."""

    dialect = "postgres"
    setting = "point DATABASE_URL at the agent's database"

    def __init__(
        self, conninfo: str, *, pool_size: int = 8, timeout: float = 3.0, operation_timeout: float = 20.0
    ) -> None:
        self._pool = AsyncConnectionPool(
            conninfo,
            min_size=1,
            max_size=pool_size,
            timeout=timeout,
            open=False,
            configure=_configure,
            # A dead peer (host gone without closing its sockets) is noticed within seconds.
            kwargs={"autocommit": False, "connect_timeout": max(1, int(timeout)), "keepalives": 1,
                    "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3},
        )
        self._operation_timeout = operation_timeout
        self._conninfo = conninfo
        self._opened = False
        try:
            info = conninfo_to_dict(conninfo)
            host, port, db = info.get("host", "localhost"), info.get("port", 5432), info.get("dbname", "")
            self.location = f"PostgreSQL {host}:{port}/{db}"
        except psycopg.ProgrammingError:
            self.location = "PostgreSQL (DATABASE_URL)"

    async def open(self) -> None:
        if not self._opened:
            await self._pool.open(wait=False)
            self._opened = True

    async def close(self) -> None:
        if self._opened:
            self._opened = False
            await self._pool.close(timeout=5.0)

    @asynccontextmanager
    async def _tx(self, *, streaming: bool = False,
                  pipelined: bool = False) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """One transaction, with library errors mapped to ours; bounded by the operation timeout unless
        `streaming` (exports, cache rebuilds), where each statement is still bounded by statement_timeout.

        `pipelined`: statements go out without waiting for each answer (libpq pipeline mode), so a write is
        two round trips (BEGIN + lock + reads, then the inserts + COMMIT) whatever its size: what keeps it
        well inside the timeouts when every round trip to a far or slow PostgreSQL takes seconds."""
        try:
            async with asyncio.timeout(None if streaming else self._operation_timeout), \
                    self._pool.connection() as conn, AsyncExitStack() as stack:
                if pipelined:
                    await stack.enter_async_context(conn.pipeline())
                await stack.enter_async_context(conn.transaction())
                yield conn
        except TimeoutError as exc:
            raise StoreUnavailable(f"{self.location}: no answer within {self._operation_timeout:.0f} s") from exc
        except PoolTimeout as exc:
            raise StoreUnavailable(f"{self.location}: no connection within the pool timeout ({exc})") from exc
        except psycopg.errors.UndefinedTable as exc:
            raise SchemaMissing(f"{self.location} has no opt-out schema ({exc}); run `optout migrate`") from exc
        except _TRANSIENT as exc:
            raise StoreUnavailable(f"{self.location}: {type(exc).__name__}: {exc}".strip()) from exc
        except psycopg.Error as exc:
            raise StoreRejected(f"{self.location} refused the data: {type(exc).__name__}: {exc}".strip()) from exc
        except (UnicodeError, ValueError) as exc:  # a value psycopg cannot send at all
            raise StoreRejected(f"{self.location}: a value cannot be sent: {exc}") from exc

    async def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        async with self._tx() as conn:
            cur = await conn.execute(sql.format(m="%s"), params)
            return await cur.fetchall()

    async def migrate(self) -> list[str]:
        applied: list[str] = []
        async with self._tx() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {TABLE_SCHEMA_VERSION} "
                "(version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            cur = await conn.execute(f"SELECT version FROM {TABLE_SCHEMA_VERSION}")
            done = {row[0] for row in await cur.fetchall()}
            for version, name, sql in migrations(self.dialect):
                if version in done:
                    continue
                await conn.execute(sql.encode())
                await conn.execute(
                    f"INSERT INTO {TABLE_SCHEMA_VERSION} (version, name) VALUES (%s, %s)", (version, name)
                )
                applied.append(name)
        return applied

    # --- writes: every one appends to the chain under CHAIN_LOCK ------------------------------------------
    async def _lock_and_read(self, conn: psycopg.AsyncConnection[Any], ids: list[str],
                             numbers: list[str]) -> tuple[set[str], set[str], str | None]:
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (CHAIN_LOCK,))
        cur = await conn.execute(
            "SELECT 'e', event_id FROM optout_actions WHERE event_id = ANY(%(ids)s)"
            " UNION ALL SELECT 'n', phone_number FROM blacklist WHERE phone_number = ANY(%(numbers)s)"
            " UNION ALL (SELECT 'h', row_hash FROM optout_actions ORDER BY id DESC LIMIT 1)",
            {"ids": ids, "numbers": numbers},
        )
        seen, listed, head = set(), set(), None
        for kind, value in await cur.fetchall():
            if kind == "e":
                seen.add(value)
            elif kind == "n":
                listed.add(value)
            else:
                head = value
        return seen, listed, head

    async def _insert(self, conn: psycopg.AsyncConnection[Any], plan: WritePlan) -> None:
        """Blacklist rows, audit rows and campaign counts in one statement (one message on the wire)."""
        if not plan.actions:
            return
        columns: dict[str, list[Any]] = {c: [row.get(c) for row in plan.actions] for c in _ROW_COLUMNS}
        columns["channel"] = [json.dumps(v, separators=(",", ":")) if v is not None else None
                              for v in columns["channel"]]
        params: dict[str, Any] = {f"a_{c}": values for c, values in columns.items()}
        params.update(
            b_phone=[r.phone_number for r in plan.blacklist], b_added=[r.received_at for r in plan.blacklist],
            b_reason=[r.reason for r in plan.blacklist], b_source=[r.source.value for r in plan.blacklist],
            b_meta=[metadata_json(r) for r in plan.blacklist],
            c_id=list(plan.campaigns), c_count=[n for n, _ in plan.campaigns.values()],
            c_last=[last for _, last in plan.campaigns.values()],
        )
        await conn.execute(_INSERT_ALL, params)

    async def write(self, records: Sequence[OptOutRecord]) -> list[StoreResult]:
        async with self._tx(pipelined=True) as conn:
            seen, listed, head = await self._lock_and_read(
                conn, [r.event_id for r in records], [r.phone_number for r in records if r.phone_number])
            plan = plan_write(records, seen_ids=seen, listed=listed, head=head, now=datetime.now(UTC))
            await self._insert(conn, plan)
        return plan.results

    async def append_action(self, row: dict[str, Any]) -> None:
        async with self._tx(pipelined=True) as conn:
            _, _, head = await self._lock_and_read(conn, [], [])
            audit.chain([row], head)
            await conn.execute(_INSERT_ACTION, _action_params(row))

    async def remove(self, removal: Removal) -> RemoveResult:
        async with self._tx(pipelined=True) as conn:
            _, _, head = await self._lock_and_read(conn, [], [])
            cur = await conn.execute(REMOVAL_REFUSED_SQL.format(m="%s"), (removal.phone_number, removal.seen_seq))
            if await cur.fetchone() is not None:
                return RemoveResult.OPTED_OUT_SINCE
            cur = await conn.execute(
                "DELETE FROM blacklist WHERE phone_number = %s RETURNING 1", (removal.phone_number,)
            )
            if await cur.fetchone() is None:
                return RemoveResult.NOT_LISTED
            row = admin_row(event_id=removal.event_id, phone_number=removal.phone_number, outcome=Outcome.REMOVED,
                            at=removal.at, recorded_at=datetime.now(UTC), actor=removal.actor, reason=removal.reason)
            audit.chain([row], head)
            await conn.execute(_INSERT_ACTION, _action_params(row))
        return RemoveResult.REMOVED

    async def import_batch(
        self, numbers: Sequence[str], *, added_at: datetime, reason: str, source: Source, actor: str,
        mark: ImportMark | None = None,
    ) -> ImportBatch:
        prefix = f"import-{uuid.uuid4().hex[:12]}-"
        async with self._tx() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (CHAIN_LOCK,))
            cur = await conn.execute(HEAD_SQL)
            after, head = chain_head_of(await cur.fetchall())
            new: list[str] = []
            seq = after
            if numbers:
                await conn.execute("CREATE TEMP TABLE import_stage (phone_number text) ON COMMIT DROP")
                async with conn.cursor().copy("COPY import_stage (phone_number) FROM STDIN") as copy:
                    await copy.write("".join(f"{n}\n" for n in numbers))
                # ON CONFLICT probes the primary key per row; an anti-join would be planned as a hash join
                # over the whole blacklist, once per batch.
                cur = await conn.execute(
                    "INSERT INTO blacklist (phone_number, added_at, reason, source)"
                    " SELECT DISTINCT phone_number, %s, %s, %s FROM import_stage"
                    " ON CONFLICT (phone_number) DO NOTHING RETURNING phone_number",
                    (added_at, reason, source.value),
                )
                new = [r[0] for r in await cur.fetchall()]
            if new:
                template = import_template(at=datetime.now(UTC), actor=actor, reason=reason, source=source)
                rows = audit.chain_uniform(template, ((prefix + n, n) for n in new), head)
                async with conn.cursor().copy(
                        f"COPY optout_actions ({', '.join(_ROW_COLUMNS)}) FROM STDIN (FORMAT binary)") as copy:
                    for data in _binary_rows(template, rows):
                        await copy.write(data)
                cur = await conn.execute("SELECT currval(pg_get_serial_sequence('optout_actions', 'id'))")
                got = await cur.fetchone()
                seq = int(got[0]) if got else after
            if mark is not None:
                await conn.execute(
                    f"UPDATE {TABLE_IMPORTS} SET last_line = %s, added = added + %s, bad = bad + %s,"
                    " updated_at = now() WHERE file_sha256 = %s", (mark.last_line, len(new), mark.bad, mark.sha256))
        return ImportBatch(new, after, seq)

    async def import_begin(self, sha256: str, name: str) -> None:
        async with self._tx() as conn:
            await conn.execute(
                f"INSERT INTO {TABLE_IMPORTS} (file_sha256, file_name) VALUES (%s, %s) ON CONFLICT (file_sha256)"
                " DO UPDATE SET file_name = EXCLUDED.file_name, last_line = 0, added = 0, bad = 0,"
                " started_at = now(), updated_at = now(), finished_at = NULL", (sha256, name))

    async def import_finish(self, sha256: str) -> None:
        async with self._tx() as conn:
            await conn.execute(f"UPDATE {TABLE_IMPORTS} SET finished_at = now(), updated_at = now()"
                               " WHERE file_sha256 = %s", (sha256,))

    async def _copy_out(self, query: str, params: Sequence[Any] = ()) -> AsyncIterator[bytes]:
        async with self._tx(streaming=True) as conn:
            # One COPY statement streams the whole table: the per-statement limit would cut a big export.
            await conn.execute("SET LOCAL statement_timeout = 0")
            async with conn.cursor().copy(query, params) as copy:
                async for data in copy:
                    yield bytes(data)

    def blacklist_csv(self) -> AsyncIterator[bytes]:
        # metadata is jsonb's text form: the same JSON as the row-by-row export, with jsonb's spacing.
        return self._copy_out(
            f"COPY (SELECT phone_number, {_iso_sql('added_at')}, reason, source, metadata::text FROM blacklist)"
            " TO STDOUT (FORMAT csv)")

    def actions_csv(
        self, columns: Sequence[str], *, campaign_id: str | None, number_prefix: str | None,
    ) -> AsyncIterator[bytes]:
        clauses, params = action_filters(campaign_id=campaign_id, number_prefix=number_prefix, since=None,
                                         until=None, mark="%s")
        timestamps = set(audit.TIMESTAMP_COLUMNS)
        selected = []
        for c in columns:
            if c == "visible_at":
                selected.append(_iso_sql("coalesce(a.visible_at, v.visible_at)"))
            elif c in timestamps:
                selected.append(_iso_sql(f"a.{c}"))
            else:
                selected.append(f"a.{c}")
        return self._copy_out(
            f"COPY (SELECT {', '.join(selected)} {ACTIONS_FROM} WHERE {' AND '.join(['TRUE', *clauses])}"
            " ORDER BY a.id) TO STDOUT (FORMAT csv)", params)

    async def record_visibility(self, seen: Sequence[tuple[str, datetime]]) -> None:
        if not seen:
            return
        async with self._tx() as conn, conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO optout_visibility (event_id, visible_at) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                list(seen))

    # --- reads ---------------------------------------------------------------------------------------------
    async def blacklisted(self, numbers: Sequence[str]) -> set[str]:
        if not numbers:
            return set()
        return {r[0] for r in await self._query("SELECT phone_number FROM blacklist WHERE phone_number = ANY({m})",
                                                (list(numbers),))}

    async def entries(self, *, batch_size: int = 10_000) -> AsyncIterator[list[BlacklistEntry]]:
        async with self._tx(streaming=True) as conn, conn.cursor(name=f"bl_{uuid.uuid4().hex[:8]}") as cur:
            await cur.execute("SELECT phone_number, added_at, reason, source, metadata FROM blacklist")
            while rows := await cur.fetchmany(batch_size):
                yield [
                    BlacklistEntry(phone_number=r[0], added_at=r[1], reason=r[2], source=r[3], metadata=r[4])
                    for r in rows
                ]

    async def changes(self, after: int, upto: int, *, limit: int = 5000) -> list[Change]:
        return [change_of(row) for row in await self._query(CHANGES_SQL, (after, upto, limit))]

    async def stored(self, event_ids: Sequence[str]) -> dict[str, int]:
        if not event_ids:
            return {}
        return {str(e): int(i) for e, i in await self._query(
            "SELECT event_id, id FROM optout_actions WHERE event_id = ANY({m})", (list(event_ids),))}

    async def watch(self) -> AsyncIterator[None]:
        """LISTEN on the channel a statement trigger on the audit trail notifies at every commit."""
        try:
            async with await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True, connect_timeout=3, keepalives=1, keepalives_idle=5,
                    keepalives_interval=2, keepalives_count=3) as conn:
                await conn.execute(f"LISTEN {CHANGE_NOTIFY_CHANNEL}")
                while True:
                    async for _ in conn.notifies(timeout=5.0, stop_after=1):
                        yield
                    # No news within the timeout: prove the connection still works.
                    await conn.execute("SELECT 1")
        except psycopg.Error as exc:  # any failure to listen is the watch lost, whatever its cause
            raise StoreUnavailable(f"{self.location}: cannot listen for changes: {exc}") from exc

    async def history(self, phone_number: str) -> list[ActionRow]:
        async with self._tx() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(f"{ACTION_SQL} WHERE a.phone_number = %s ORDER BY a.id", (phone_number,))
            return [ActionRow(**row) for row in await cur.fetchall()]

    async def actions(
        self, *, campaign_id: str | None = None, number_prefix: str | None = None,
        since: datetime | None = None, until: datetime | None = None,
    ) -> AsyncIterator[ActionRow]:
        clauses, params = action_filters(campaign_id=campaign_id, number_prefix=number_prefix, since=since,
                                         until=until, mark="%s")
        async for row in self._rows(f"{ACTION_SQL} WHERE {' AND '.join(['TRUE', *clauses])} ORDER BY a.id", params):
            yield row

    async def _rows(self, query: str, params: list[Any]) -> AsyncIterator[ActionRow]:
        """Audit rows streamed through a server-side cursor."""
        async with self._tx(streaming=True) as conn, conn.cursor(
            name=f"act_{uuid.uuid4().hex[:8]}", row_factory=dict_row
        ) as cur:
            await cur.execute(query, params)
            while rows := await cur.fetchmany(5000):
                for row in rows:
                    yield ActionRow(**row)
