"""The pre-dial check never answers "clear" for a number that opted out: Redis is trusted for a "clear" only
while the cache keeper proves it current, and the keeper catches up with every writer's changes."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from agent.cache import RedisCache
from agent.cache_sync import CacheSync
from agent.constants import BLACKLIST_SENTINEL, BLACKLIST_SEQ, BLACKLIST_SET, BLACKLIST_SYNCED
from agent.journal import Journal
from agent.pipeline import OptOutPipeline, Status
from agent.precheck import BlacklistChecker
from agent.store import Removal
from agent.store_postgres import PostgresStore
from tests.conftest import make_record

A, B, C = "+972501234567", "+972521234567", "+972531234567"


def keeper(store: PostgresStore, cache: RedisCache, journal: Journal | None = None, lease: float = 30.0) -> CacheSync:
    return CacheSync(store=store, cache=cache, journal=journal, lease=lease, interval=0.05)


async def test_redis_answers_clear_only_while_the_keeper_proves_it_current(
    pg_store: PostgresStore, cache: RedisCache, redis_sync: redis.Redis
) -> None:
    await pg_store.write([make_record(A)])
    sync = keeper(pg_store, cache)
    await sync.tick()  # rebuild
    assert await sync.tick()  # proven current: lease renewed
    checker = BlacklistChecker(store=pg_store, cache=cache, region="IL")
    redis_sync.sadd(BLACKLIST_SET, B)  # only Redis holds B: proves Redis answered
    assert await checker.check([A, B, C]) == [True, True, False]
    redis_sync.delete(BLACKLIST_SYNCED)  # no lease: a "clear" from Redis proves nothing
    assert await checker.check([A, B, C]) == [True, True, False]  # C now comes from the store
    redis_sync.sadd(BLACKLIST_SET, C)
    redis_sync.srem(BLACKLIST_SET, A)
    assert await checker.check([A]) == [True], "without the lease the store answers for A"


async def test_the_lease_runs_out_when_nobody_keeps_the_cache(
    pg_store: PostgresStore, cache: RedisCache, redis_sync: redis.Redis
) -> None:
    sync = keeper(pg_store, cache, lease=0.3)
    await sync.tick()
    assert await sync.tick() and redis_sync.exists(BLACKLIST_SYNCED)
    await asyncio.sleep(0.4)
    assert not redis_sync.exists(BLACKLIST_SYNCED)


async def test_a_missing_set_means_not_synced(pg_store: PostgresStore, cache: RedisCache,
                                              redis_sync: redis.Redis) -> None:
    await pg_store.write([make_record(A)])
    sync = keeper(pg_store, cache)
    await sync.tick()
    assert await sync.tick()
    redis_sync.delete(BLACKLIST_SET)  # evicted under maxmemory, or a manual DEL; the lease stays
    assert redis_sync.exists(BLACKLIST_SYNCED)
    checker = BlacklistChecker(store=pg_store, cache=cache, region="IL")
    assert await checker.check([A]) == [True]
    await sync.tick()  # the keeper sees the set gone and rebuilds it
    assert redis_sync.sismember(BLACKLIST_SET, A) and redis_sync.sismember(BLACKLIST_SET, BLACKLIST_SENTINEL)


async def test_a_lost_set_that_a_write_re_created_is_still_lost(
    pg_store: PostgresStore, cache: RedisCache, redis_sync: redis.Redis, journal: Journal
) -> None:
    await pg_store.write([make_record(A)])
    sync = keeper(pg_store, cache)
    await sync.tick()
    assert await sync.tick()
    redis_sync.delete(BLACKLIST_SET)  # lost; seq and the lease stay
    # Before any keeper looks, a press re-creates the set, and another keeper applies the change feed.
    pipeline = OptOutPipeline(journal=journal, store=pg_store, cache=cache)
    assert (await pipeline.submit(make_record(B))).status is Status.STORED
    seq = int(redis_sync.get(BLACKLIST_SEQ) or 0)
    changes = await pg_store.changes(seq, await pg_store.head())
    assert not await cache.apply(changes, expected=seq, new=await pg_store.head(), lease_ms=30_000), \
        "a set without the sentinel must not be marked current"
    assert not await cache.renew(seq, lease_ms=30_000)
    checker = BlacklistChecker(store=pg_store, cache=cache, region="IL")
    assert await checker.check([A, B], strict=True) == [True, True]
    assert await checker.check([A, B]) == [True, True], "A is in the store: never clear"
    await sync.tick()  # the keeper rebuilds it
    assert redis_sync.smismember(BLACKLIST_SET, [A, B, BLACKLIST_SENTINEL]) == [1, 1, 1]


async def test_a_set_lost_during_a_rebuild_is_not_sealed(
    pg_store: PostgresStore, cache: RedisCache, redis_sync: redis.Redis
) -> None:
    await pg_store.write([make_record(A), make_record(B)])
    sync = CacheSync(store=pg_store, cache=cache, journal=None, batch=1, lease=30.0)
    entries = pg_store.entries

    async def lost_midway(*, batch_size: int = 10_000) -> Any:
        first = True
        async for batch in entries(batch_size=batch_size):
            yield batch
            if first:
                redis_sync.delete(BLACKLIST_SET)  # evicted while the copy goes on
                first = False

    pg_store.entries = lost_midway  # type: ignore[method-assign]
    assert await sync.rebuild() == -1
    assert not redis_sync.sismember(BLACKLIST_SET, BLACKLIST_SENTINEL), "a partial copy must not look whole"
    assert not await sync.tick() and not redis_sync.exists(BLACKLIST_SYNCED)
    checker = BlacklistChecker(store=pg_store, cache=cache, region="IL")
    assert await checker.check([A, B]) == [True, True]
    pg_store.entries = entries  # type: ignore[method-assign]
    assert await sync.rebuild() == 2
    assert redis_sync.smismember(BLACKLIST_SET, [A, B, BLACKLIST_SENTINEL]) == [1, 1, 1]
    assert [m for m in redis_sync.smembers(BLACKLIST_SET) if m.startswith("~rebuild:")] == []


async def test_one_keeper_rebuilds_at_a_time(pg_store: PostgresStore, cache: RedisCache,
                                             redis_sync: redis.Redis) -> None:
    from agent.constants import BLACKLIST_REBUILDING

    await pg_store.write([make_record(A)])
    redis_sync.set(BLACKLIST_REBUILDING, "another-keeper", px=5000)
    assert await keeper(pg_store, cache).rebuild() == -1
    assert not redis_sync.sismember(BLACKLIST_SET, BLACKLIST_SENTINEL)
    redis_sync.delete(BLACKLIST_REBUILDING)  # that keeper died: its claim lapses (here: at once)
    assert await keeper(pg_store, cache).rebuild() == 1
    assert redis_sync.sismember(BLACKLIST_SET, BLACKLIST_SENTINEL)


async def test_a_removal_never_takes_out_an_optout_committed_after_it(
    pg_store: PostgresStore, pg_dsn: str, redis_url: str, tmp_path: Path
) -> None:
    from contextlib import AsyncExitStack

    from agent.admin import remove
    from agent.core import open_core
    from agent.settings import Settings

    settings = Settings(database_url=pg_dsn, redis_url=redis_url, optout_default_region="IL",
                        optout_journal_path=tmp_path / "journal.db")
    async with AsyncExitStack() as stack:
        core = await open_core(settings, stack)
        assert core.cache_sync is not None
        await core.pipeline.submit(make_record(A))
        await core.cache_sync.tick()
        assert await core.cache_sync.tick()
        # An opt-out of A accepted before the removal, its store write landing right after it (a slow hangup).
        late = make_record(A).model_copy(update={"event_id": "late-a", "received_at": datetime.now(UTC)})
        await asyncio.sleep(0.01)
        store_remove = core.store.remove

        async def remove_then_late_write(removal: Removal) -> bool:
            removed = await store_remove(removal)
            await core.store.write([late])
            return removed

        core.store.remove = remove_then_late_write  # type: ignore[method-assign]
        removed, note = await remove(core, A, reason="consent", actor="alice")
        assert removed and note is None
        assert await core.store.blacklisted([A]) == {A}, "the store holds the later opt-out"
        assert await core.checker.check([A]) == [True], "Redis must not answer clear for what the store holds"
        assert await core.checker.check([A], strict=True) == [True]


async def test_a_second_writers_missed_redis_write_is_caught_up_and_never_answered_clear(
    pg_store: PostgresStore, cache: RedisCache, redis_sync: redis.Redis, tmp_path: Path
) -> None:
    sync = keeper(pg_store, cache)
    await sync.tick()
    assert await sync.tick()
    # Another writer (the CLI, a bridge, another agent) stores A while its own Redis is unreachable.
    async with Journal(tmp_path / "other.db") as other_journal, \
            RedisCache("redis://127.0.0.1:1/0", timeout=0.2) as dead:
        other = OptOutPipeline(journal=other_journal, store=pg_store, cache=dead)
        assert (await other.submit(make_record(A))).status is Status.STORED
    assert not redis_sync.sismember(BLACKLIST_SET, A)
    checker = BlacklistChecker(store=pg_store, cache=cache, region="IL")
    assert await checker.check([A], strict=True) == [True], "`optout check` sees the cache is behind the store"
    await sync.tick()
    assert redis_sync.sismember(BLACKLIST_SET, A)
    [row] = await pg_store.history(A)
    assert row["visible_at"] is None and row["cache_visible_at"] is not None, "the keeper noted when it made it visible"


async def test_rebuild_keeps_numbers_journaled_but_not_stored(
    pg_store: PostgresStore, cache: RedisCache, redis_sync: redis.Redis, journal: Journal
) -> None:
    await pg_store.write([make_record(A)])
    await journal.append(make_record(B))  # accepted while the store was down: in the journal only
    redis_sync.flushdb()  # Redis restarted empty
    sync = keeper(pg_store, cache, journal)
    await sync.tick()
    assert redis_sync.smismember(BLACKLIST_SET, [A, B]) == [1, 1]


async def test_removals_apply_in_order_and_never_undo_a_later_optout(
    pg_store: PostgresStore, cache: RedisCache, redis_sync: redis.Redis, journal: Journal
) -> None:
    pipeline = OptOutPipeline(journal=journal, store=pg_store, cache=cache)
    await pipeline.submit(make_record(A))
    await pipeline.submit(make_record(B))
    sync = keeper(pg_store, cache)
    await sync.tick()
    await sync.tick()
    await pg_store.remove(Removal(A, "consent", "alice", "rm-a", datetime.now(UTC)))
    await pg_store.remove(Removal(B, "consent", "alice", "rm-b", datetime.now(UTC)))
    # B opts out again before any keeper applied the removal (its store write is still on its way).
    await asyncio.sleep(0.01)
    await pipeline.make_visible(make_record(B).model_copy(update={"received_at": datetime.now(UTC)}))
    await sync.tick()
    assert redis_sync.smismember(BLACKLIST_SET, [A, B]) == [0, 1]


async def test_keepers_in_two_agents_never_apply_changes_out_of_order(
    pg_store: PostgresStore, cache: RedisCache, redis_sync: redis.Redis
) -> None:
    await pg_store.write([make_record(A)])
    first = keeper(pg_store, cache)
    await first.tick()
    seq = int(redis_sync.get(BLACKLIST_SEQ) or 0)
    await pg_store.remove(Removal(A, "consent", "alice", "rm-a", datetime.now(UTC)))
    stale = await pg_store.changes(0, seq)  # what a slow keeper read before the removal was applied
    await keeper(pg_store, cache).tick()  # another agent's keeper applies the removal
    assert not redis_sync.sismember(BLACKLIST_SET, A)
    assert not await cache.apply(stale, expected=0, new=seq, lease_ms=0), "the slow keeper's old view is refused"
    assert not redis_sync.sismember(BLACKLIST_SET, A)


async def test_redis_down_falls_back_to_the_store(pg_store: PostgresStore) -> None:
    await pg_store.write([make_record(A)])
    async with RedisCache("redis://127.0.0.1:1/0", timeout=0.2) as dead:
        checker = BlacklistChecker(store=pg_store, cache=dead, region="IL")
        assert await checker.check([A, B]) == [True, False]


async def test_keeper_refills_redis_after_it_restarts_empty(
    pipeline: OptOutPipeline, pg_store: PostgresStore, cache: RedisCache, redis_sync: redis.Redis
) -> None:
    for i in range(5):
        await pipeline.submit(make_record(f"+9725012345{i:02d}"))
    redis_sync.flushdb()
    task = asyncio.create_task(keeper(pg_store, cache).run())
    for _ in range(100):
        if redis_sync.exists(BLACKLIST_SYNCED):
            break
        await asyncio.sleep(0.05)
    task.cancel()
    assert redis_sync.scard(BLACKLIST_SET) == 5 + 1  # and the sentinel


async def test_a_rebuild_that_fails_gives_its_claim_back(cache: RedisCache, redis_sync: redis.Redis) -> None:
    import pytest

    from agent.constants import BLACKLIST_REBUILDING
    from agent.errors import StoreUnavailable

    async with PostgresStore("postgresql://postgres@127.0.0.1:1/none", timeout=0.3) as dead:
        with pytest.raises(StoreUnavailable):
            await keeper(dead, cache).rebuild()
    assert not redis_sync.exists(BLACKLIST_REBUILDING), "the next keeper must not wait for a dead claim"
