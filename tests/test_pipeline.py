"""The opt-out pipeline on the real PostgreSQL and Redis, including PostgreSQL outages and restarts."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import psycopg
import redis

from agent.cache import RedisCache
from agent.constants import BLACKLIST_SET, action_key, blacklist_entry_key, campaign_counter_key
from agent.journal import Journal
from agent.optout import HangupInfo
from agent.pipeline import OptOutPipeline, Replayer, Status
from agent.store_postgres import PostgresStore
from tests.conftest import PG_BASE, make_record, with_schema
from tests.tcp_proxy import TcpProxy


async def test_optout_lands_in_store_redis_and_journal(
    pipeline: OptOutPipeline, pg_store: PostgresStore, redis_sync: redis.Redis
) -> None:
    rec = make_record()
    result = await pipeline.submit(rec)
    assert result.status is Status.RECORDED
    assert await pg_store.blacklisted([rec.phone_number or ""]) == {rec.phone_number}
    assert redis_sync.sismember(BLACKLIST_SET, rec.phone_number or "")
    entry = json.loads(redis_sync.get(blacklist_entry_key(rec.phone_number or "")) or "{}")
    assert entry["phoneNumber"] == rec.phone_number and entry["source"] == "user_optout"
    assert entry["metadata"]["callId"] == "call-1"
    assert 0 < redis_sync.ttl(action_key(rec.event_id)) <= 24 * 3600
    assert redis_sync.get(campaign_counter_key("camp-1")) == "1"
    assert await pipeline.journal.depth() == 0


async def test_same_event_twice_is_a_duplicate_and_counts_once(
    pipeline: OptOutPipeline, redis_sync: redis.Redis
) -> None:
    rec = make_record()
    first, second = await asyncio.gather(pipeline.submit(rec), pipeline.submit(rec))
    assert {first.status, second.status} == {Status.RECORDED, Status.DUPLICATE}
    third = await pipeline.submit(rec)
    assert third.status is Status.DUPLICATE
    assert redis_sync.get(campaign_counter_key("camp-1")) == "1"


async def test_call_is_ended_once_journaled_and_the_hangup_is_audited(
    pipeline: OptOutPipeline, pg_store: PostgresStore
) -> None:
    calls = []

    async def terminate() -> HangupInfo:
        calls.append(await pipeline.journal.depth())
        return HangupInfo(method="ari", result="ok")

    result = await pipeline.submit(make_record(), terminate=terminate)
    assert calls == [1], "the call must be ended only once the opt-out is in the journal"
    assert result.hangup is not None
    [row] = await pg_store.history("+972501234567")
    assert row["hangup_method"] == "ari" and row["hangup_result"] == "ok"


async def test_failing_terminate_does_not_lose_the_optout(pipeline: OptOutPipeline, pg_store: PostgresStore) -> None:
    async def terminate() -> HangupInfo:
        raise RuntimeError("channel gone")

    result = await pipeline.submit(make_record(), terminate=terminate)
    assert result.status is Status.RECORDED
    [row] = await pg_store.history("+972501234567")
    assert row["hangup_result"].startswith("error: channel gone")


async def test_redis_down_is_not_critical(journal: Journal, pg_store: PostgresStore) -> None:
    async with RedisCache("redis://127.0.0.1:1/0", timeout=0.2) as dead:
        pipe = OptOutPipeline(journal=journal, store=pg_store, cache=dead)
        result = await pipe.submit(make_record())
    assert result.status is Status.RECORDED
    assert await pg_store.blacklisted(["+972501234567"]) == {"+972501234567"}


async def test_postgres_unreachable_mid_run_every_optout_lands_once_back(
    journal: Journal, pg_schema: str, cache: RedisCache, redis_sync: redis.Redis
) -> None:
    proxy = await TcpProxy("127.0.0.1", 5432).start()
    dsn = with_schema(PG_BASE.replace(":5432/", f":{proxy.port}/"), pg_schema)
    async with PostgresStore(dsn, timeout=1.0) as store:
        await store.migrate()
        pipe = OptOutPipeline(journal=journal, store=store, cache=cache)
        before = [make_record(f"+9725012{i:05d}") for i in range(10)]
        during = [make_record(f"+9725013{i:05d}") for i in range(20)]
        assert {r.status for r in await asyncio.gather(*(pipe.submit(r) for r in before))} == {Status.RECORDED}
        proxy.cut()
        results = await asyncio.gather(*(pipe.submit(r) for r in during))
        assert {r.status for r in results} == {Status.JOURNALED}
        assert await journal.depth() == 20
        proxy.restore()
        replayer = Replayer(pipe, interval=0.05)
        task = asyncio.create_task(replayer.run())
        for _ in range(200):
            if await journal.depth() == 0:
                break
            await asyncio.sleep(0.05)
        task.cancel()
        numbers = [r.phone_number or "" for r in before + during]
        assert await store.blacklisted(numbers) == set(numbers)
        for r in during:
            assert len(await store.history(r.phone_number or "")) == 1
        assert redis_sync.scard(BLACKLIST_SET) == 30
    await proxy.stop()


def test_journaled_optout_is_stored_by_a_new_process_after_restart(tmp_path: Path, pg_dsn: str) -> None:
    """Process 1 journals while PostgreSQL is unreachable and exits; process 2 replays it."""
    journal_path = tmp_path / "journal.db"
    rec = make_record()

    async def first_process() -> None:
        async with Journal(journal_path) as j, PostgresStore("postgresql://postgres@127.0.0.1:1/x", timeout=0.5) as s:
            result = await OptOutPipeline(journal=j, store=s, cache=None).submit(rec)
            assert result.status is Status.JOURNALED

    asyncio.run(first_process())
    code = f"""
import asyncio
from pathlib import Path
from agent.journal import Journal
from agent.pipeline import OptOutPipeline, Replayer
from agent.store_postgres import PostgresStore

async def main():
    async with Journal(Path({str(journal_path)!r})) as j, PostgresStore({pg_dsn!r}) as s:
        await s.migrate()
        print(await Replayer(OptOutPipeline(journal=j, store=s, cache=None)).drain())

asyncio.run(main())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"

    async def check() -> None:
        async with PostgresStore(pg_dsn) as s:
            [row] = await s.history(rec.phone_number or "")
            assert row["event_id"] == rec.event_id

    asyncio.run(check())


async def test_a_stuck_lock_sends_the_optout_to_the_journal_instead_of_stalling(
    pipeline: OptOutPipeline, pg_store: PostgresStore, pg_dsn: str
) -> None:
    await pipeline.submit(make_record())
    with psycopg.connect(pg_dsn) as blocker:
        blocker.execute("LOCK TABLE optout_actions IN EXCLUSIVE MODE")  # a session that died holding a lock
        result = await pipeline.submit(make_record())
        assert result.status is Status.JOURNALED
    assert await Replayer(pipeline).drain() == 1
    assert len(await pg_store.history("+972501234567")) == 2


async def test_replayed_duplicate_after_a_lost_acknowledgement_still_reaches_redis(
    pipeline: OptOutPipeline, pg_store: PostgresStore, redis_sync: redis.Redis
) -> None:
    rec = make_record()
    await pipeline.journal.append(rec)
    await pg_store.record([rec])  # committed, but the agent never heard back
    assert await Replayer(pipeline).drain() == 1
    assert redis_sync.sismember(BLACKLIST_SET, rec.phone_number or "")
    assert redis_sync.get(campaign_counter_key("camp-1")) is None  # counted once, by the original write


async def test_failed_redis_write_marks_the_cache_untrusted_until_rebuilt(
    journal: Journal, pg_store: PostgresStore, redis_url: str, redis_sync: redis.Redis
) -> None:
    from agent.constants import BLACKLIST_SYNCED
    from agent.precheck import BlacklistChecker, CacheReconciler

    host, port = "127.0.0.1", int(redis_url.split(":")[2].split("/")[0])
    proxy = await TcpProxy(host, port).start()
    db = redis_url.rsplit("/", 1)[1]
    async with RedisCache(f"redis://127.0.0.1:{proxy.port}/{db}", timeout=0.3) as cache:
        await cache.sync_from(pg_store)
        pipe = OptOutPipeline(journal=journal, store=pg_store, cache=cache)
        proxy.cut()
        assert (await pipe.submit(make_record())).status is Status.RECORDED
        proxy.restore()
        assert cache.dirty
        assert not redis_sync.sismember(BLACKLIST_SET, "+972501234567")
        checker = BlacklistChecker(store=pg_store, cache=cache, region="IL")
        assert await checker.check(["+972501234567"]) == [True]  # the store answered
        task = asyncio.create_task(CacheReconciler(store=pg_store, cache=cache, interval=0.05).run())
        for _ in range(100):
            if not cache.dirty and redis_sync.exists(BLACKLIST_SYNCED):
                break
            await asyncio.sleep(0.05)
        task.cancel()
        assert redis_sync.sismember(BLACKLIST_SET, "+972501234567")
    await proxy.stop()
