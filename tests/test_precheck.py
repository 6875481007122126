"""The pre-dial check never answers "clear" for a stored number: Redis only while it is marked complete."""

from __future__ import annotations

import asyncio

import redis

from agent.cache import RedisCache
from agent.constants import BLACKLIST_SET, BLACKLIST_SYNCED
from agent.pipeline import OptOutPipeline
from agent.precheck import BlacklistChecker, CacheReconciler
from agent.store_postgres import PostgresStore
from tests.conftest import make_record


async def test_redis_answers_once_synced(pg_store: PostgresStore, cache: RedisCache, redis_sync: redis.Redis) -> None:
    await pg_store.record([make_record("+972501234567")])
    await cache.sync_from(pg_store)
    checker = BlacklistChecker(store=pg_store, cache=cache, region="IL")
    # Prove Redis answers: a number only Redis holds is reported listed.
    redis_sync.sadd(BLACKLIST_SET, "+972521234567")
    assert await checker.check(["+972501234567", "+972521234567", "+972531234567"]) == [True, True, False]


async def test_unsynced_redis_is_not_trusted(pg_store: PostgresStore, cache: RedisCache,
                                            redis_sync: redis.Redis) -> None:
    await pg_store.record([make_record("+972501234567")])
    redis_sync.flushdb()  # Redis restarted empty: no marker
    checker = BlacklistChecker(store=pg_store, cache=cache, region="IL")
    assert await checker.is_blacklisted("050-123-4567") is True


async def test_redis_down_falls_back_to_the_store(pg_store: PostgresStore) -> None:
    await pg_store.record([make_record("+972501234567")])
    async with RedisCache("redis://127.0.0.1:1/0", timeout=0.2) as dead:
        checker = BlacklistChecker(store=pg_store, cache=dead, region="IL")
        assert await checker.check(["+972501234567", "+972521234567"]) == [True, False]


async def test_reconciler_refills_redis_after_it_restarts_empty(
    pipeline: OptOutPipeline, pg_store: PostgresStore, cache: RedisCache, redis_sync: redis.Redis
) -> None:
    for i in range(5):
        await pipeline.submit(make_record(f"+9725012345{i:02d}"))
    redis_sync.flushdb()
    task = asyncio.create_task(CacheReconciler(store=pg_store, cache=cache, interval=0.05).run())
    for _ in range(100):
        if redis_sync.exists(BLACKLIST_SYNCED):
            break
        await asyncio.sleep(0.05)
    task.cancel()
    assert redis_sync.scard(BLACKLIST_SET) == 5
