"""The dialers' view in Redis (agent/cache.py) and its keeper (agent/keeper.py): never "clear" for a number
that opted out, against the real PostgreSQL, Redis and SQLite. One test per breach of issue 19 (the
numbers in their names), plus the model's own rules."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from agent.admin import remove
from agent.cache import Applied, RedisCache, ViewState
from agent.constants import BLACKLIST_KEEPER, BLACKLIST_LEASE, BLACKLIST_SENTINEL, BLACKLIST_SET, BLACKLIST_VIEW
from agent.errors import StoreUnavailable
from agent.journal import Journal
from agent.keeper import CacheKeeper
from agent.lookup import BlacklistChecker
from agent.pipeline import OptOutPipeline, Status
from agent.store import Position, Removal, RemoveResult, Store
from agent.store_postgres import PostgresStore
from agent.store_sqlite import SqliteStore
from tests.conftest import PG_BASE, make_record, with_schema
from tests.tcp_proxy import TcpProxy

A, B, C = "+972501234567", "+972521234567", "+972531234567"


def keeper(store: Store, cache: RedisCache, journal: Journal | None = None, *, lease: float = 30.0,
           interval: float = 0.05) -> CacheKeeper:
    return CacheKeeper(store=store, cache=cache, journal=journal, lease=lease, interval=interval)


async def current(k: CacheKeeper, rounds: int = 60) -> None:
    """Rounds until the keeper proves the view current (the swap's grace included)."""
    for _ in range(rounds):
        if await k.round():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the keeper never proved the view current")


def checker(store: Store, cache: RedisCache | None, journal: Journal | None = None) -> BlacklistChecker:
    return BlacklistChecker(store=store, cache=cache, journal=journal, region="IL")


@contextlib.asynccontextmanager
async def cut_store(dsn: str) -> AsyncIterator[tuple[PostgresStore, TcpProxy]]:
    """A PostgresStore whose link goes through a proxy the test can cut."""
    proxy = await TcpProxy("127.0.0.1", 5432).start()
    async with PostgresStore(dsn.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}"), timeout=1.0,
                             operation_timeout=3.0) as store:
        try:
            yield store, proxy
        finally:
            await proxy.stop()


# --- the model's own rules ---------------------------------------------------------------------------------
async def test_a_clear_from_redis_is_trusted_only_while_the_view_is_current(
    pg_store: PostgresStore, cache: RedisCache, redis_sync: redis.Redis
) -> None:
    await pg_store.write([make_record(A)])
    k = keeper(pg_store, cache)
    assert await cache.state() is ViewState.LOST
    await current(k)
    assert await cache.state() is ViewState.CURRENT
    check = checker(pg_store, cache)
    redis_sync.sadd(BLACKLIST_SET, B)  # only Redis holds B: proves Redis answered
    assert await check.check([A, B, C]) == [True, True, False]
    redis_sync.delete(BLACKLIST_LEASE)  # no lease: a "clear" from Redis proves nothing
    assert await cache.state() is ViewState.STALE
    redis_sync.srem(BLACKLIST_SET, A)
    redis_sync.sadd(BLACKLIST_SET, C)
    assert await check.check([A]) == [True], "without the lease the store answers for A"


async def test_the_lease_runs_out_when_nobody_keeps_the_view(pg_store: PostgresStore, cache: RedisCache,
                                                             redis_sync: redis.Redis) -> None:
    k = keeper(pg_store, cache, lease=0.4)
    await current(k)
    assert redis_sync.exists(BLACKLIST_LEASE)
    await asyncio.sleep(0.5)
    assert not redis_sync.exists(BLACKLIST_LEASE) and await cache.state() is ViewState.STALE


async def test_a_lost_set_that_a_write_re_created_is_still_lost(
    pg_store: PostgresStore, cache: RedisCache, redis_sync: redis.Redis, journal: Journal
) -> None:
    await pg_store.write([make_record(A)])
    k = keeper(pg_store, cache)
    await current(k)
    redis_sync.delete(BLACKLIST_SET)  # evicted; the view's sequence and the lease stay
    pipeline = OptOutPipeline(journal=journal, store=pg_store, cache=cache)
    assert (await pipeline.submit(make_record(B))).status is Status.STORED  # re-creates the set, no sentinel
    assert await cache.state() is ViewState.LOST
    assert await checker(pg_store, cache).check([A, B, C]) == [True, True, False], "A comes from the store"
    await current(k)
    assert redis_sync.smismember(BLACKLIST_SET, [A, B, BLACKLIST_SENTINEL]) == [1, 1, 1]


async def test_a_paused_former_keeper_cannot_write_over_the_new_one(
    pg_store: PostgresStore, cache: RedisCache, redis_sync: redis.Redis
) -> None:
    await pg_store.write([make_record(A)])
    k = keeper(pg_store, cache)
    await current(k)
    view = await cache.view()
    assert view.position is not None
    await pg_store.remove(Removal(A, "consent", "alice", "rm-a", datetime.now(UTC), seen_seq=view.position.seq))
    stale = await pg_store.changes(0, view.position.seq)  # what a slow keeper read before the removal
    redis_sync.set(BLACKLIST_KEEPER, "another-keeper", px=5000)  # its lock lapsed; another keeper holds it now
    assert await cache.apply("paused-keeper", stale, expected=view.position, new=view.position, lease_ms=30_000,
                             lock_ms=2000) is Applied.NOT_KEEPER
    redis_sync.delete(BLACKLIST_KEEPER)
    await current(k)  # the removal is applied
    assert not redis_sync.sismember(BLACKLIST_SET, A)
    redis_sync.set(BLACKLIST_KEEPER, "paused-keeper", px=5000)  # even holding a lock, an old sequence is refused
    assert await cache.apply("paused-keeper", stale, expected=Position(0, ""), new=view.position, lease_ms=0,
                             lock_ms=2000) is Applied.MOVED
    assert not redis_sync.sismember(BLACKLIST_SET, A)


async def test_only_one_keeper_keeps_the_view_in_a_round(pg_store: PostgresStore, cache: RedisCache,
                                                         redis_sync: redis.Redis) -> None:
    redis_sync.set(BLACKLIST_KEEPER, "another-keeper", px=5000)
    assert not await keeper(pg_store, cache).round()
    assert await cache.state() is ViewState.LOST, "the keeper without the lock changes nothing"
    redis_sync.delete(BLACKLIST_KEEPER)  # that keeper died: its lock lapses (here: at once)
    await current(keeper(pg_store, cache))
    assert not redis_sync.exists(BLACKLIST_KEEPER), "the lock is given back after each round"


async def test_a_clear_is_never_read_across_a_lost_set_and_a_rebuild(
    pg_store: PostgresStore, cache: RedisCache, redis_sync: redis.Redis
) -> None:
    """Lease, sentinel and membership are read in one MULTI: a set lost between two reads is never taken for
    an empty current one."""
    await pg_store.write([make_record(A)])
    k = keeper(pg_store, cache, interval=0.01)
    await current(k)
    check = checker(pg_store, cache)
    stop = asyncio.Event()

    async def churn() -> None:
        while not stop.is_set():
            redis_sync.delete(BLACKLIST_SET)
            await current(k)

    task = asyncio.create_task(churn())
    answers: list[bool | None] = []
    loop = asyncio.get_running_loop()
    until = loop.time() + 3.0
    while loop.time() < until:
        answers += await check.check([A])
        await asyncio.sleep(0)
    stop.set()
    await task
    assert len(answers) > 100 and answers.count(False) == 0 and answers.count(None) == 0


# --- issue 19, breach 1: a rebuild never drops another agent's unstored opt-out --------------------------------
async def test_1_an_exact_rebuild_keeps_an_optout_another_agent_holds_unstored(
    pg_store: PostgresStore, pg_dsn: str, cache: RedisCache, redis_sync: redis.Redis, tmp_path: Path
) -> None:
    healthy = keeper(pg_store, cache)
    await current(healthy)
    async with cut_store(pg_dsn) as (store_a, link), Journal(tmp_path / "a.db") as journal_a:
        agent_a = OptOutPipeline(journal=journal_a, store=store_a, cache=cache)
        keeper_a = keeper(store_a, cache, journal_a)
        link.cut()  # agent A loses its PostgreSQL link
        assert (await agent_a.submit(make_record(A))).status is Status.JOURNALED
        assert await healthy.rebuild() >= 0  # `optout sync-cache --exact` elsewhere
        await current(healthy)
        assert await checker(pg_store, cache).check([A]) == [True]
        assert await checker(pg_store, cache).check([A], strict=True) == [True]
        redis_sync.flushdb()  # Redis restarted empty: A's round re-asserts before any keeper rebuilds
        with pytest.raises(StoreUnavailable):
            await keeper_a.round()
        await current(healthy)
        assert await checker(pg_store, cache).check([A]) == [True], "A re-asserted its journal in its round"
        link.restore()
        from agent.pipeline import Replayer

        for _ in range(40):  # the replayer, once A's pool has reconnected
            with contextlib.suppress(StoreUnavailable):
                assert await Replayer(agent_a).drain() == 1
                break
            await asyncio.sleep(0.25)
        else:
            raise AssertionError("agent A never stored its journaled opt-out")
    await current(healthy)
    view = await cache.view()
    assert view.pending == {}, "once stored and applied, the pending mark is dropped"
    assert await checker(pg_store, cache).check([A], strict=True) == [True]


# --- breach 2: a removal racing a press never deletes the newer press ------------------------------------------
async def test_2_a_removal_never_deletes_an_optout_stored_after_it_was_asked_for(store: Store) -> None:
    await store.write([make_record(A)])
    seen = await store.head()  # the operator asks for the removal here
    await store.write([make_record(A)])  # a new press of A is stored before the removal commits
    removal = Removal(A, "consent", "alice", "rm-a", datetime.now(UTC), seen_seq=seen)
    assert await store.remove(removal) is RemoveResult.OPTED_OUT_SINCE
    assert await store.blacklisted([A]) == {A}
    later = Removal(A, "consent", "alice", "rm-a2", datetime.now(UTC), seen_seq=await store.head())
    assert await store.remove(later) is RemoveResult.REMOVED


async def test_2_a_removal_on_a_slow_link_racing_a_press_leaves_the_press_listed(
    pg_dsn: str, pg_store: PostgresStore, redis_url: str, tmp_path: Path
) -> None:
    from contextlib import AsyncExitStack

    from agent.core import open_core
    from agent.settings import Settings

    await pg_store.write([make_record(A)])
    proxy = await TcpProxy("127.0.0.1", 5432, delay=0.1).start()
    slow = pg_dsn.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    settings = Settings(database_url=slow, redis_url=redis_url, optout_default_region="IL",
                        optout_journal_path=tmp_path / "admin.db")
    async with AsyncExitStack() as stack:
        core = await open_core(settings, stack)
        await core.store.ping()  # the pool's connection is up before the race
        head_read = asyncio.Event()
        read_head = core.store.head

        async def noted_head() -> int:
            value = await read_head()
            head_read.set()
            return value

        core.store.head = noted_head  # type: ignore[method-assign]
        removal = asyncio.create_task(remove(core, A, reason="consent", actor="alice"))
        await head_read.wait()
        await pg_store.write([make_record(A)])  # the press lands while the removal is on the wire
        result, _ = await removal
        assert result is RemoveResult.OPTED_OUT_SINCE
    await proxy.stop()
    assert await pg_store.blacklisted([A]) == {A}
    async with RedisCache(redis_url) as cache:
        await current(keeper(pg_store, cache))
        assert await keeper(pg_store, cache).rebuild() >= 0
        await current(keeper(pg_store, cache))
        assert await checker(pg_store, cache).check([A]) == [True]


async def test_2_a_removal_never_takes_out_a_number_some_writer_holds_unstored(
    pg_store: PostgresStore, cache: RedisCache, redis_sync: redis.Redis, journal: Journal
) -> None:
    await pg_store.write([make_record(A)])
    k = keeper(pg_store, cache)
    await current(k)
    seen = await pg_store.head()
    await journal.append(make_record(A))  # a press of A journaled here, not stored yet
    await keeper(pg_store, cache, journal).reassert()
    await pg_store.remove(Removal(A, "consent", "alice", "rm-a", datetime.now(UTC), seen_seq=seen))
    await current(k)
    assert redis_sync.sismember(BLACKLIST_SET, A), "the view keeps a number a writer holds unstored"
    assert await checker(pg_store, cache).check([A]) == [True]


# --- breach 3: a store that went back is noticed before any "clear" is trusted ---------------------------------
def _pg(dsn: str, sql: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql)


async def test_3_a_store_restored_from_an_earlier_dump_is_rebuilt_from_and_loses_no_optout(
    pg_schema: str, cache: RedisCache, redis_sync: redis.Redis, tmp_path: Path
) -> None:
    dsn = with_schema(PG_BASE, pg_schema)
    early = [f"+97250000{i:04d}" for i in range(3)]
    later = [f"+97252000{i:04d}" for i in range(10)]
    fresh = [f"+97253000{i:04d}" for i in range(5)]
    dump = tmp_path / "backup.sql"
    async with PostgresStore(dsn) as store:
        await store.migrate()
        await store.write([make_record(n) for n in early])
        subprocess.run(["pg_dump", "--no-owner", "-n", pg_schema, "-f", str(dump), PG_BASE], check=True)
        for n in later:
            await store.write([make_record(n)])
        await current(keeper(store, cache))
        assert (await cache.view()).position == (await store.position()).head
    # The database is restored from the dump taken earlier (agents reconnect to it).
    _pg(PG_BASE, f"DROP SCHEMA {pg_schema} CASCADE")
    subprocess.run(["psql", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(dump), PG_BASE], check=True,
                   capture_output=True)
    async with PostgresStore(dsn) as store:
        from agent.constants import Source

        await store.import_batch(fresh, added_at=datetime.now(UTC), reason="bulk", source=Source.ADMIN_IMPORT,
                                 actor="alice")
        assert await store.head() <= 13, "the new changes reuse sequences the view already passed"
        check = checker(store, cache)
        assert await check.check(fresh, strict=True) == [True] * 5, "strict: the lineage differs, the store answers"
        k = keeper(store, cache)
        await k.round()  # notices, drops the lease, writes back what the store lost, rebuilds
        assert await check.check(fresh) == [True] * 5
        await current(k)
        assert await store.blacklisted(later) == set(later), "the opt-outs the restore lost are written back"
        assert await check.check([*early, *later, *fresh], strict=True) == [True] * 18
        rows = await store.history(later[0])
        assert rows[-1].origin == "admin" and rows[-1].reason.startswith("recovered")


def restore_file(backup: Path, path: Path) -> None:
    import shutil

    shutil.copy(backup, path)
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


async def test_3_a_store_that_went_back_is_noticed_on_sqlite_too(cache: RedisCache, tmp_path: Path) -> None:
    import shutil

    path = tmp_path / "store.db"
    async with SqliteStore(path) as store:
        await store.migrate()
        await store.write([make_record(A)])
    shutil.copy(path, tmp_path / "backup.db")
    async with SqliteStore(path) as store:
        await store.write([make_record(B)])
        await current(keeper(store, cache))
    restore_file(tmp_path / "backup.db", path)
    async with SqliteStore(path) as store:
        await store.write([make_record(C)])  # reuses change 2
        assert await checker(store, cache).check([C], strict=True) == [True]
        await current(keeper(store, cache))
        assert await checker(store, cache).check([A, B, C], strict=True) == [True, True, True]
        assert await store.blacklisted([B]) == {B}


# --- breach 4: embedded store, no Redis: the journal answers for what it holds ---------------------------------
def test_4_without_redis_the_check_consults_the_journal_while_the_store_cannot_be_written(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OPTOUT_DATA_DIR": str(tmp_path / "data")}

    def optout(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agent.cli", *args], env=env, capture_output=True, text=True,
                              timeout=60, check=False)

    assert optout("migrate").returncode == 0

    async def press_while_locked() -> None:
        async with Journal(tmp_path / "data" / "journal.db") as journal:
            await journal.append(make_record(A))  # journaled; the store write is what fails

    import sqlite3

    lock = sqlite3.connect(tmp_path / "data" / "optout.db", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # the store cannot be written (locked, like a full disk)
    try:
        asyncio.run(press_while_locked())
        out = optout("check", A)
        assert out.returncode == 1 and "BLACKLISTED" in out.stdout, out.stdout + out.stderr
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert optout("check", B).returncode == 0


# --- breach 5: a Redis-less writer's commit reaches the view by push, imports included ------------------------
async def test_5_a_commit_by_a_writer_without_redis_is_pushed_to_the_keeper(
    pg_store: PostgresStore, cache: RedisCache, redis_sync: redis.Redis, tmp_path: Path
) -> None:
    k = keeper(pg_store, cache, lease=120.0, interval=60.0)  # no round by the clock within the test
    await current(k)
    task = asyncio.create_task(k.run())
    await asyncio.sleep(0.3)  # listening
    try:
        async with Journal(tmp_path / "other.db") as other_journal, \
                RedisCache("redis://127.0.0.1:1/0", timeout=0.2) as dead:
            other = OptOutPipeline(journal=other_journal, store=pg_store, cache=dead)
            assert (await other.submit(make_record(A))).status is Status.STORED
        for _ in range(100):
            if redis_sync.sismember(BLACKLIST_SET, A):
                break
            await asyncio.sleep(0.05)
        assert redis_sync.sismember(BLACKLIST_SET, A), "only the store's push could wake the keeper"
        assert await checker(pg_store, cache).check([A]) == [True]
        for _ in range(100):  # the keeper notes the time in the store right after its apply
            [row] = await pg_store.history(A)
            if row.cache_visible_at is not None:
                break
            await asyncio.sleep(0.05)
        assert row.visible_at is None and row.cache_visible_at is not None, "the keeper noted when"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_5_keepers_apply_a_bulk_import_while_it_runs(
    pg_dsn: str, redis_url: str, redis_sync: redis.Redis, tmp_path: Path
) -> None:
    from contextlib import AsyncExitStack

    from agent import bulk
    from agent.constants import Source
    from agent.core import open_core
    from agent.settings import Settings

    path = tmp_path / "numbers.csv"
    path.write_text("phone\n" + "".join(f"+9725{i:08d}\n" for i in range(3000)))
    settings = Settings(database_url=pg_dsn, redis_url=redis_url, optout_default_region="IL",
                        optout_journal_path=tmp_path / "journal.db")
    async with AsyncExitStack() as stack:
        core = await open_core(settings, stack)
        await core.store.migrate()
        async with PostgresStore(pg_dsn) as agent_store, RedisCache(redis_url) as agent_cache:
            agent = keeper(agent_store, agent_cache, lease=120.0, interval=60.0)
            await current(agent)
            running = asyncio.create_task(agent.run())
            seen_during: list[int] = []
            import_batch = core.store.import_batch

            async def watched(*args: Any, **kwargs: Any) -> Any:
                batch = await import_batch(*args, **kwargs)
                if batch.added and not seen_during:
                    for _ in range(100):  # the agent's keeper applies this batch while the import goes on
                        if redis_sync.sismember(BLACKLIST_SET, batch.added[-1]):
                            seen_during.append(batch.last_seq)
                            break
                        await asyncio.sleep(0.05)
                return batch

            core.store.import_batch = watched  # type: ignore[method-assign]
            report = await bulk.import_numbers(core, path.open("rb"), name="numbers.csv",
                                                source=Source.ADMIN_IMPORT, reason="bulk", actor="alice",
                                                block_bytes=4096, workers=1)
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
    assert report.added == 3000 and report.cache_error is None
    assert seen_during, "the keeper applied the import's first batch before the import finished"
    assert redis_sync.scard(BLACKLIST_SET) == 3000 + 1


# --- Redis that went back (a failover that lost writes) -----------------------------------------------------------
async def test_redis_that_went_back_holds_the_lease_until_writers_re_asserted(
    pg_store: PostgresStore, cache: RedisCache, redis_sync: redis.Redis, journal: Journal
) -> None:
    for n in (A, B):
        await pg_store.write([make_record(n)])
    k = keeper(pg_store, cache, journal)
    await current(k)
    await journal.append(make_record(C))  # held unstored by this process
    await k.reassert()
    # A failover to a replica that missed the last writes: an older position, C's pending mark and number lost.
    redis_sync.hset(BLACKLIST_VIEW, mapping={"seq": "1", "lineage": (await pg_store.position(1)).lineage_at or ""})
    redis_sync.hdel(BLACKLIST_VIEW, *[f for f in redis_sync.hkeys(BLACKLIST_VIEW) if f.startswith("p:")])
    redis_sync.srem(BLACKLIST_SET, C, B)
    assert not await k.round(), "the lease is held: writers re-assert first"
    assert await checker(pg_store, cache, journal).check([A, B, C]) == [True, True, True]
    await current(k)
    assert redis_sync.smismember(BLACKLIST_SET, [A, B, C]) == [1, 1, 1]


async def test_an_unexpected_error_in_a_round_never_stops_the_keeper(
    pg_store: PostgresStore, cache: RedisCache, redis_sync: redis.Redis
) -> None:
    k = keeper(pg_store, cache, interval=0.05)
    await current(k)
    changes = pg_store.changes
    failures = 0

    async def broken_once(*args: Any, **kwargs: Any) -> Any:
        nonlocal failures
        if failures < 2:
            failures += 1
            raise RuntimeError("a row nobody foresaw")
        return await changes(*args, **kwargs)

    pg_store.changes = broken_once  # type: ignore[method-assign]
    task = asyncio.create_task(k.run())
    try:
        await pg_store.write([make_record(A)])
        for _ in range(200):
            if redis_sync.sismember(BLACKLIST_SET, A):
                break
            await asyncio.sleep(0.05)
        assert failures == 2 and redis_sync.sismember(BLACKLIST_SET, A) and not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
