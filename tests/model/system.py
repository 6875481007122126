"""The system the model checker drives: several agents (journal, store link, pipeline, keeper, checker each)
over one real PostgreSQL schema or SQLite file and one real Redis database, plus a writer without Redis and
a dialer that reads Redis and the store directly. Every step is one thing an operator, a callee or a fault
does; the checker (tests/test_model_checker.py) decides what may be answered after it.

This is the only file that knows the product's API: the checker's model and invariants stay the same when it
changes (a copy of this file against an older API is how the checker was run on the code before issue 19).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import redis.asyncio as aioredis

from agent.cache import RedisCache
from agent.constants import BLACKLIST_SET, Origin, Source
from agent.errors import CacheUnavailable, JournalError, OptOutError, StoreUnavailable
from agent.journal import Journal
from agent.keeper import CacheKeeper
from agent.lookup import BlacklistChecker
from agent.optout import OptOutRecord
from agent.pipeline import OptOutPipeline, Replayer, Status
from agent.store import Removal, RemoveResult, Store
from agent.store_postgres import PostgresStore
from agent.store_sqlite import SqliteStore
from tests.conftest import with_schema
from tests.tcp_proxy import TcpProxy

FAULTS = (CacheUnavailable, StoreUnavailable, JournalError)


def record(number: str, *, origin: Origin = Origin.ARI, source: Source = Source.USER_OPTOUT) -> OptOutRecord:
    return OptOutRecord(event_id=f"m-{uuid.uuid4().hex}", phone_number=number, origin=origin, source=source,
                        digit="9", received_at=datetime.now(UTC))


@dataclass
class Agent:
    """One process that writes and keeps: its own journal file, its own store link, the shared Redis."""

    name: str
    journal_path: Path
    redis_url: str | None
    proxy: TcpProxy | None = None
    journal: Journal | None = None
    store: Store | None = None
    cache: RedisCache | None = None
    pipeline: OptOutPipeline | None = None
    keeper: CacheKeeper | None = None
    checker: BlacklistChecker | None = None
    stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)


class System:
    def __init__(self, *, kind: str, workdir: Path, pg_base: str, redis_url: str, agents: int = 2) -> None:
        self.kind = kind
        self.workdir = workdir
        self.pg_base = pg_base
        self.redis_url = redis_url
        self.schema = f"m_{uuid.uuid4().hex[:10]}"
        self.sqlite_path = workdir / "store.db"
        self.agents = [Agent(f"agent-{i}", workdir / f"journal-{i}.db", redis_url) for i in range(agents)]
        self.writer = Agent("writer-without-redis", workdir / "journal-w.db", None)
        self.dialer: BlacklistChecker | None = None
        self._dialer_stack = contextlib.AsyncExitStack()
        self._redis: aioredis.Redis = aioredis.Redis.from_url(redis_url)
        self._redis_snapshot: list[tuple[bytes, int, bytes]] | None = None
        self._store_backup: Path | None = None

    # --- lifecycle -------------------------------------------------------------------------------------
    @property
    def dsn(self) -> str:
        return with_schema(self.pg_base, self.schema)

    async def open(self) -> None:
        await self._redis.flushdb()
        if self.kind == "postgres":
            with psycopg.connect(self.pg_base, autocommit=True) as conn:
                conn.execute(f"CREATE SCHEMA {self.schema}")
        async with self._new_store(None) as store:
            await store.migrate()
        for agent in [*self.agents, self.writer]:
            if self.kind == "postgres":
                agent.proxy = await TcpProxy("127.0.0.1", 5432).start()
            await self._open_agent(agent)
        store = await self._dialer_stack.enter_async_context(self._new_store(None))
        cache = await self._dialer_stack.enter_async_context(RedisCache(self.redis_url))
        self.dialer = BlacklistChecker(store=store, cache=cache, journal=None, region="IL")

    def _new_store(self, proxy: TcpProxy | None) -> Store:
        if self.kind == "sqlite":
            return SqliteStore(self.sqlite_path)
        dsn = self.dsn if proxy is None else self.dsn.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        return PostgresStore(dsn, timeout=0.3, operation_timeout=1.0)

    async def _open_agent(self, agent: Agent) -> None:
        agent.stack = contextlib.AsyncExitStack()
        agent.journal = await agent.stack.enter_async_context(Journal(agent.journal_path))
        agent.store = await agent.stack.enter_async_context(self._new_store(agent.proxy))
        agent.cache = None
        if agent.redis_url is not None:
            agent.cache = await agent.stack.enter_async_context(RedisCache(agent.redis_url))
            agent.keeper = CacheKeeper(store=agent.store, cache=agent.cache, journal=agent.journal, lease=60.0,
                                       grace=0.0, interval=0.05)
        agent.pipeline = OptOutPipeline(journal=agent.journal, store=agent.store, cache=agent.cache,
                                        hangup_timeout=0.5)
        agent.checker = BlacklistChecker(store=agent.store, cache=agent.cache, journal=agent.journal, region="IL")

    async def close(self) -> None:
        for agent in [*self.agents, self.writer]:
            await agent.stack.aclose()
            if agent.proxy is not None:
                await agent.proxy.stop()
        await self._dialer_stack.aclose()
        await self._redis.flushdb()
        await self._redis.aclose()
        if self.kind == "postgres":
            with psycopg.connect(self.pg_base, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")

    # --- what callees, operators and faults do -------------------------------------------------------------
    async def press(self, agent: Agent, number: str, *, origin: Origin = Origin.ARI) -> Status | None:
        """An opt-out through an agent's pipeline: its status, None when not even the journal took it."""
        assert agent.pipeline is not None
        try:
            return (await agent.pipeline.submit(record(number, origin=origin))).status
        except JournalError:
            return None

    async def remove(self, agent: Agent, number: str) -> RemoveResult | None:
        """`optout remove`: the store orders it against opt-outs stored since the head it read first."""
        assert agent.store is not None
        try:
            seen = await agent.store.head()
            return await agent.store.remove(Removal(number, "consent", "operator", f"rm-{uuid.uuid4().hex}",
                                                    datetime.now(UTC), seen_seq=seen))
        except StoreUnavailable:
            return None

    async def import_(self, agent: Agent, numbers: list[str]) -> bool:
        assert agent.store is not None
        try:
            await agent.store.import_batch(numbers, added_at=datetime.now(UTC), reason="bulk",
                                           source=Source.ADMIN_IMPORT, actor="operator")
        except StoreUnavailable:
            return False
        return True

    async def keeper_round(self, agent: Agent) -> bool | None:
        """One keeper round; None when a fault stopped it."""
        assert agent.keeper is not None
        try:
            return await agent.keeper.round()
        except FAULTS:
            return None

    async def sync_cache(self, agent: Agent, *, exact: bool) -> bool:
        """`optout sync-cache` (every rebuild is exact now)."""
        assert agent.keeper is not None
        try:
            return await agent.keeper.rebuild() >= 0
        except FAULTS:
            return False

    async def replay(self, agent: Agent) -> None:
        assert agent.pipeline is not None
        with contextlib.suppress(*FAULTS):
            await Replayer(agent.pipeline).drain()

    async def check(self, who: Agent | None, numbers: list[str], *, strict: bool) -> list[bool | None]:
        """A pre-dial check by an agent (its checker, its journal) or, with None, by a dialer."""
        checker = self.dialer if who is None else who.checker
        assert checker is not None
        try:
            return await checker.check(numbers, strict=strict)
        except OptOutError:
            return [None] * len(numbers)

    async def unstored(self, agent: Agent) -> int:
        assert agent.journal is not None
        return await agent.journal.depth()

    async def unstored_numbers(self, agent: Agent) -> set[str]:
        assert agent.journal is not None
        return {n for _, n in await agent.journal.unstored_numbers()}

    async def describe(self, number: str) -> str:
        """What Redis and the store hold about a number (for a failing history's message)."""
        from agent.constants import BLACKLIST_LEASE, BLACKLIST_SENTINEL, BLACKLIST_VIEW

        r = self._redis
        view = {k.decode(): v.decode() for k, v in (await r.hgetall(BLACKLIST_VIEW)).items()}
        lines = [f"redis: member={await r.sismember(BLACKLIST_SET, number)} sentinel="
                 f"{await r.sismember(BLACKLIST_SET, BLACKLIST_SENTINEL)} lease={await r.get(BLACKLIST_LEASE)!r} "
                 f"view={view}"]
        try:
            async with self._new_store(None) as store:
                lines.append(f"store: listed={bool(await store.blacklisted([number]))} head={await store.head()} "
                             f"history={[(h.id, h.outcome, h.event_id) for h in await store.history(number)]}")
        except OptOutError as exc:
            lines.append(f"store: {exc}")
        for agent in [*self.agents, self.writer]:
            if agent.journal is not None:
                lines.append(f"{agent.name} journal unstored: {await agent.journal.unstored_numbers()}")
        return "\n".join(lines)

    # Faults --------------------------------------------------------------------------------------------------
    async def evict_set(self) -> None:
        await self._redis.delete(BLACKLIST_SET)

    async def flush_redis(self) -> None:
        """Redis flushed, or restarted empty."""
        await self._redis.flushdb()

    async def snapshot_redis(self) -> None:
        """What a replica holds now: a failover later loses everything written after this."""
        keys = [k async for k in self._redis.scan_iter(count=1000)]
        snapshot = []
        for key in keys:
            dumped, ttl = await self._redis.dump(key), await self._redis.pttl(key)
            if dumped is not None:
                snapshot.append((key, max(0, ttl), dumped))
        self._redis_snapshot = snapshot

    async def fail_over(self) -> bool:
        """A failover to the replica of the last snapshot (the writes since are lost)."""
        if self._redis_snapshot is None:
            return False
        await self._redis.flushdb()
        for key, ttl, dumped in self._redis_snapshot:
            await self._redis.restore(key, ttl, dumped, replace=True)
        return True

    def cut(self, agent: Agent) -> None:
        if agent.proxy is not None:
            agent.proxy.cut()

    def restore_link(self, agent: Agent) -> None:
        if agent.proxy is not None:
            agent.proxy.restore()

    async def backup_store(self) -> None:
        path = self.workdir / f"backup-{uuid.uuid4().hex[:6]}"
        if self.kind == "postgres":
            await asyncio.to_thread(subprocess.run, ["pg_dump", "--no-owner", "-n", self.schema, "-f", str(path),
                                                     self.pg_base], check=True, capture_output=True)
        else:
            async with SqliteStore(self.sqlite_path) as store:  # a consistent copy: checkpoint first
                await store.ping()
            await asyncio.to_thread(_sqlite_backup, self.sqlite_path, path)
        self._store_backup = path

    async def restore_store(self) -> bool:
        """The store restored from the last backup while everything runs (agents reconnect)."""
        if self._store_backup is None:
            return False
        every = [*self.agents, self.writer]
        for agent in every:
            await agent.stack.aclose()
        await self._dialer_stack.aclose()
        if self.kind == "postgres":
            with psycopg.connect(self.pg_base, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {self.schema} CASCADE")
            await asyncio.to_thread(subprocess.run, ["psql", "-q", "-v", "ON_ERROR_STOP=1", "-f",
                                                     str(self._store_backup), self.pg_base],
                                    check=True, capture_output=True)
        else:
            await asyncio.to_thread(_sqlite_restore, self._store_backup, self.sqlite_path)
        for agent in every:
            await self._open_agent(agent)
        store = await self._dialer_stack.enter_async_context(self._new_store(None))
        cache = await self._dialer_stack.enter_async_context(RedisCache(self.redis_url))
        self.dialer = BlacklistChecker(store=store, cache=cache, journal=None, region="IL")
        return True

    async def kill_and_restart(self, agent: Agent) -> None:
        """SIGKILL and a new process on the same journal (nothing in flight: steps run one at a time)."""
        await agent.stack.aclose()
        await self._open_agent(agent)


def _sqlite_restore(backup: Path, path: Path) -> None:
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    shutil.copy(backup, path)


def _sqlite_backup(source: Path, target: Path) -> None:
    import sqlite3

    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    with dst:
        src.backup(dst)
    src.close()
    dst.close()
