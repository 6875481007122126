"""PostgreSQL store (the system of record), on psycopg 3 with an async connection pool."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from agent.constants import TABLE_SCHEMA_VERSION, Outcome, Source
from agent.errors import StoreUnavailable
from agent.optout import BlacklistEntry, OptOutRecord
from agent.store import ACTION_COLUMNS, Removal, Store, StoreResult, action_params, migrations

_MIGRATION_LOCK = 0x0F7_0A7  # pg_advisory_xact_lock key: one migrator at a time

_COLS = ", ".join(ACTION_COLUMNS)
_VALS = ", ".join(f"%({c})s" for c in ACTION_COLUMNS)

# One round trip per record: skip a known event id, add the number (first addedAt wins), write the
# audit row with the outcome that follows, and count the campaign.
_RECORD_SQL = f"""
WITH seen AS (
    SELECT 1 FROM optout_actions WHERE event_id = %(event_id)s
), bl AS (
    INSERT INTO blacklist (phone_number, added_at, reason, source, metadata)
    SELECT %(phone_number)s, %(received_at)s, %(reason)s, %(source)s, %(metadata)s
    WHERE %(phone_number)s::text IS NOT NULL AND NOT EXISTS (SELECT 1 FROM seen)
    ON CONFLICT (phone_number) DO NOTHING
    RETURNING 1
), act AS (
    INSERT INTO optout_actions ({_COLS}, outcome)
    SELECT {_VALS},
        CASE WHEN %(phone_number)s::text IS NULL THEN 'number_unknown'
             WHEN EXISTS (SELECT 1 FROM bl) THEN 'blacklisted'
             ELSE 'already_blacklisted' END
    WHERE NOT EXISTS (SELECT 1 FROM seen)
    ON CONFLICT (event_id) DO NOTHING
    RETURNING outcome
), cc AS (
    INSERT INTO campaign_optouts (campaign_id, optouts, last_optout_at)
    SELECT %(campaign_id)s, 1, %(received_at)s
    WHERE %(campaign_id)s::text IS NOT NULL AND EXISTS (SELECT 1 FROM act)
    ON CONFLICT (campaign_id) DO UPDATE
        SET optouts = campaign_optouts.optouts + 1,
            last_optout_at = GREATEST(campaign_optouts.last_optout_at, EXCLUDED.last_optout_at)
)
SELECT (SELECT outcome FROM act)
"""


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    """Session limits on every new connection: a stuck lock or statement fails fast and the opt-out goes
    to the journal replayer, instead of stalling every write behind it."""
    async with conn.transaction():
        await conn.execute(
            "SET statement_timeout = '5s'; SET lock_timeout = '2s'; SET idle_in_transaction_session_timeout = '10s'"
        )


class PostgresStore(Store):
    """The store on PostgreSQL. `conninfo` is a libpq URL; credentials come from it (the environment)."""

    dialect = "postgres"

    def __init__(
        self, conninfo: str, *, pool_size: int = 8, timeout: float = 3.0, operation_timeout: float = 10.0
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
        self._opened = False

    async def open(self) -> None:
        if not self._opened:
            await self._pool.open(wait=False)
            self._opened = True

    async def close(self) -> None:
        if self._opened:
            self._opened = False
            await self._pool.close(timeout=5.0)

    @asynccontextmanager
    async def _tx(self, *, streaming: bool = False) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """One transaction; bounded by the operation timeout unless `streaming` (exports, cache rebuilds),
        where each statement is still bounded by the session's statement_timeout."""
        try:
            async with asyncio.timeout(None if streaming else self._operation_timeout), \
                    self._pool.connection() as conn, conn.transaction():
                yield conn
        except TimeoutError as exc:
            raise StoreUnavailable(f"PostgreSQL: no answer within {self._operation_timeout:.0f} s") from exc
        except PoolTimeout as exc:
            raise StoreUnavailable(f"PostgreSQL: no connection within the pool timeout ({exc})") from exc
        except psycopg.Error as exc:
            raise StoreUnavailable(f"PostgreSQL: {type(exc).__name__}: {exc}".strip()) from exc

    async def ping(self) -> None:
        async with self._tx() as conn:
            await conn.execute("SELECT 1")

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

    async def record(self, records: Sequence[OptOutRecord]) -> list[StoreResult]:
        params = []
        for rec in records:
            p = action_params(rec)
            p["channel"] = Jsonb(rec.channel) if rec.channel else None
            meta = rec.metadata()
            p["metadata"] = Jsonb(meta) if meta else None
            params.append(p)
        async with self._tx() as conn, conn.cursor() as cur:
            await cur.executemany(_RECORD_SQL, params, returning=True)
            results = []
            for rec in records:
                row = await cur.fetchone()
                outcome = row[0] if row else None
                results.append(
                    StoreResult(rec.event_id, duplicate=outcome is None, outcome=Outcome(outcome) if outcome else None)
                )
                cur.nextset()
        return results

    async def remove(self, removal: Removal) -> bool:
        async with self._tx() as conn:
            cur = await conn.execute(
                "DELETE FROM blacklist WHERE phone_number = %s RETURNING 1", (removal.phone_number,)
            )
            if await cur.fetchone() is None:
                return False
            await conn.execute(
                "INSERT INTO optout_actions (event_id, phone_number, origin, received_at, outcome, actor, reason)"
                " VALUES (%s, %s, 'admin', %s, %s, %s, %s)",
                (removal.event_id, removal.phone_number, removal.at, Outcome.REMOVED.value, removal.actor,
                 removal.reason),
            )
        return True

    async def blacklisted(self, numbers: Sequence[str]) -> set[str]:
        if not numbers:
            return set()
        async with self._tx() as conn:
            cur = await conn.execute(
                "SELECT phone_number FROM blacklist WHERE phone_number = ANY(%s)", (list(numbers),)
            )
            return {row[0] for row in await cur.fetchall()}

    async def entries(
        self, *, batch_size: int = 10_000, since: datetime | None = None
    ) -> AsyncIterator[list[BlacklistEntry]]:
        where, params = (
            ("WHERE phone_number IN (SELECT phone_number FROM optout_actions WHERE recorded_at >= %s)", (since,))
            if since else ("", ())
        )
        async with self._tx(streaming=True) as conn, conn.cursor(name=f"bl_{uuid.uuid4().hex[:8]}") as cur:
            await cur.execute(
                f"SELECT phone_number, added_at, reason, source, metadata FROM blacklist {where}", params
            )
            while rows := await cur.fetchmany(batch_size):
                yield [
                    BlacklistEntry(phone_number=r[0], added_at=r[1], reason=r[2], source=r[3], metadata=r[4])
                    for r in rows
                ]

    async def import_numbers(
        self, numbers: Sequence[str], *, added_at: datetime, reason: str, source: Source, actor: str
    ) -> int:
        if not numbers:
            return 0
        prefix = f"import-{uuid.uuid4().hex[:12]}-"
        now = datetime.now(UTC)
        async with self._tx() as conn:
            await conn.execute(
                "CREATE TEMP TABLE import_stage (phone_number text) ON COMMIT DROP"
            )
            async with conn.cursor().copy("COPY import_stage (phone_number) FROM STDIN") as copy:
                await copy.write("".join(f"{n}\n" for n in numbers))
            cur = await conn.execute(
                """
                WITH new AS (
                    INSERT INTO blacklist (phone_number, added_at, reason, source)
                    SELECT DISTINCT phone_number, %(added_at)s, %(reason)s, %(source)s FROM import_stage
                    ON CONFLICT (phone_number) DO NOTHING
                    RETURNING phone_number
                ), audit AS (
                    INSERT INTO optout_actions (event_id, phone_number, origin, source, received_at, outcome,
                                                actor, reason)
                    SELECT %(prefix)s || phone_number, phone_number, 'admin', %(source)s, %(now)s, 'blacklisted',
                           %(actor)s, %(reason)s
                    FROM new
                )
                SELECT count(*) FROM new
                """,
                {"prefix": prefix, "now": now, "actor": actor, "added_at": added_at, "reason": reason,
                 "source": source.value},
            )
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def history(self, phone_number: str) -> list[dict[str, Any]]:
        async with self._tx() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute("SELECT * FROM optout_actions WHERE phone_number = %s ORDER BY id", (phone_number,))
            return list(await cur.fetchall())

    async def actions(
        self, *, campaign_id: str | None = None, number_prefix: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        clauses, params = [], []
        if campaign_id is not None:
            clauses.append("campaign_id = %s")
            params.append(campaign_id)
        if number_prefix is not None:
            clauses.append("phone_number LIKE %s")
            params.append(number_prefix.replace("%", r"\%").replace("_", r"\_") + "%")
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        async with self._tx(streaming=True) as conn, conn.cursor(
            name=f"act_{uuid.uuid4().hex[:8]}", row_factory=dict_row
        ) as cur:
            await cur.execute(f"SELECT * FROM optout_actions {where} ORDER BY id", params)
            while rows := await cur.fetchmany(5000):
                for row in rows:
                    yield row

    async def campaign_count(self, campaign_id: str) -> int:
        async with self._tx() as conn:
            cur = await conn.execute("SELECT optouts FROM campaign_optouts WHERE campaign_id = %s", (campaign_id,))
            row = await cur.fetchone()
            return int(row[0]) if row else 0
