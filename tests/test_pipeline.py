"""The opt-out pipeline on the real PostgreSQL and Redis, including PostgreSQL outages and restarts, a journal
that cannot be written, and records the store refuses."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
import redis

from agent.cache import RedisCache
from agent.constants import BLACKLIST_SET, Origin, action_key, blacklist_entry_key, campaign_counter_key
from agent.journal import Journal, PublishState, StoreState
from agent.keeper import CacheKeeper
from agent.lookup import BlacklistChecker
from agent.optout import HangupInfo, OptOutEvent, OptOutRecord, record_from_event
from agent.pipeline import KEPT_WHEN_STRIPPED, OptOutPipeline, Replayer, Status, stripped
from agent.store_postgres import PostgresStore
from tests.conftest import PG_BASE, make_record, with_schema
from tests.tcp_proxy import TcpProxy

DEAD_PG = "postgresql://postgres@127.0.0.1:1/none"


async def test_optout_lands_in_store_redis_and_journal(
    pipeline: OptOutPipeline, pg_store: PostgresStore, redis_sync: redis.Redis
) -> None:
    rec = make_record()
    result = await pipeline.submit(rec)
    assert result.status is Status.STORED
    assert await pg_store.blacklisted([rec.phone_number or ""]) == {rec.phone_number}
    assert redis_sync.sismember(BLACKLIST_SET, rec.phone_number or "")
    entry = json.loads(redis_sync.get(blacklist_entry_key(rec.phone_number or "")) or "{}")
    assert entry["phoneNumber"] == rec.phone_number and entry["source"] == "user_optout"
    assert entry["metadata"]["callId"] == "call-1"
    assert 0 < redis_sync.ttl(action_key(rec.event_id)) <= 24 * 3600
    assert redis_sync.get(campaign_counter_key("camp-1")) == "1"
    assert await pipeline.journal.depth() == 0
    [row] = await pg_store.history(rec.phone_number or "")
    assert row.journaled_at <= row.visible_at <= row.recorded_at


async def test_same_event_twice_is_a_duplicate_and_counts_once(
    pipeline: OptOutPipeline, redis_sync: redis.Redis
) -> None:
    rec = make_record()
    first, second = await asyncio.gather(pipeline.submit(rec), pipeline.submit(rec))
    assert {first.status, second.status} == {Status.STORED, Status.DUPLICATE}
    third = await pipeline.submit(rec)
    assert third.status is Status.DUPLICATE
    assert redis_sync.get(campaign_counter_key("camp-1")) == "1"


async def test_call_is_ended_once_journaled_and_the_hangup_is_audited(
    pipeline: OptOutPipeline, pg_store: PostgresStore
) -> None:
    calls = []

    async def hang_up() -> HangupInfo:
        calls.append(await pipeline.journal.depth())
        return HangupInfo(method="ari", result="ok")

    result = await pipeline.submit(make_record(), hang_up=hang_up)
    assert calls == [1], "the call must be ended only once the opt-out is in the journal"
    assert result.hangup is not None
    [row] = await pg_store.history("+972501234567")
    assert row.hangup_method == "ari" and row.hangup_result == "ok"


async def test_a_redelivered_optout_does_not_hang_up_again(pipeline: OptOutPipeline) -> None:
    hangups: list[str] = []

    async def hang_up() -> HangupInfo:
        hangups.append("x")
        return HangupInfo(method="worker-api", result="ok")

    rec = make_record()
    await pipeline.submit(rec, hang_up=hang_up)
    again = await pipeline.submit(rec, hang_up=hang_up)
    assert again.status is Status.DUPLICATE and hangups == ["x"]


async def test_failing_hangup_does_not_lose_the_optout(pipeline: OptOutPipeline, pg_store: PostgresStore) -> None:
    async def hang_up() -> HangupInfo:
        raise RuntimeError("channel gone")

    result = await pipeline.submit(make_record(), hang_up=hang_up)
    assert result.status is Status.STORED
    [row] = await pg_store.history("+972501234567")
    assert row.hangup_result.startswith("error: channel gone")


async def test_redis_down_is_not_critical(journal: Journal, pg_store: PostgresStore) -> None:
    async with RedisCache("redis://127.0.0.1:1/0", timeout=0.2) as dead:
        pipe = OptOutPipeline(journal=journal, store=pg_store, cache=dead)
        result = await pipe.submit(make_record())
    assert result.status is Status.STORED
    assert await pg_store.blacklisted(["+972501234567"]) == {"+972501234567"}


# --- the suppression guarantee through a store outage ------------------------------------------------------
async def test_store_down_the_number_is_in_redis_right_after_the_journal(
    journal: Journal, cache: RedisCache, redis_sync: redis.Redis
) -> None:
    async with PostgresStore(DEAD_PG, timeout=0.5) as down:
        pipe = OptOutPipeline(journal=journal, store=down, cache=cache)
        result = await pipe.submit(make_record())
        assert result.status is Status.JOURNALED
        assert redis_sync.sismember(BLACKLIST_SET, "+972501234567")
        checker = BlacklistChecker(store=down, cache=cache, journal=journal, region="IL")
        assert await checker.check(["+972501234567"], strict=True) == [True]
        assert await checker.check(["+972521234567"], strict=True) == [None], "no 'clear' nobody can vouch for"


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
        assert {r.status for r in await asyncio.gather(*(pipe.submit(r) for r in before))} == {Status.STORED}
        proxy.cut()
        results = await asyncio.gather(*(pipe.submit(r) for r in during))
        assert {r.status for r in results} == {Status.JOURNALED}
        assert await journal.depth() == 20
        assert all(redis_sync.smismember(BLACKLIST_SET, [r.phone_number or "" for r in during]))
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
            [row] = await store.history(r.phone_number or "")
            assert row.visible_at is not None and row.visible_at < row.recorded_at
        assert redis_sync.scard(BLACKLIST_SET) == 30
    await proxy.stop()


def test_journaled_optout_is_stored_by_a_new_process_after_restart(tmp_path: Path, pg_dsn: str) -> None:
    """Process 1 journals while PostgreSQL is unreachable and exits; process 2 replays it."""
    journal_path = tmp_path / "journal.db"
    rec = make_record()

    async def first_process() -> None:
        async with Journal(journal_path) as j, PostgresStore(DEAD_PG, timeout=0.5) as s:
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
            assert row.event_id == rec.event_id

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


async def test_replayed_duplicate_after_a_lost_acknowledgement_is_counted_once(
    pipeline: OptOutPipeline, pg_store: PostgresStore, cache: RedisCache, redis_sync: redis.Redis
) -> None:
    rec = make_record()
    await pipeline.journal.append(rec)
    await pg_store.write([rec])  # committed, but the agent never heard back
    assert await Replayer(pipeline).drain() == 1
    assert await pipeline.journal.depth() == 0
    await CacheKeeper(store=pg_store, cache=cache, journal=pipeline.journal).round()
    assert redis_sync.sismember(BLACKLIST_SET, rec.phone_number or "")
    assert redis_sync.get(campaign_counter_key("camp-1")) is None  # counted once, by the original write


async def test_a_failed_redis_write_is_re_asserted_and_never_answered_clear(
    journal: Journal, pg_store: PostgresStore, redis_url: str, redis_sync: redis.Redis
) -> None:
    host, port = "127.0.0.1", int(redis_url.split(":")[2].split("/")[0])
    proxy = await TcpProxy(host, port).start()
    db = redis_url.rsplit("/", 1)[1]
    async with RedisCache(f"redis://127.0.0.1:{proxy.port}/{db}", timeout=0.3) as cache:
        keeper = CacheKeeper(store=pg_store, cache=cache, journal=journal, lease=30.0)
        for _ in range(40):
            if await keeper.round():
                break
            await asyncio.sleep(0.05)
        pipe = OptOutPipeline(journal=journal, store=pg_store, cache=cache)
        proxy.cut()
        await pipe.journal.append(make_record("+972521234567"))  # journaled, not stored (as during an outage)
        assert (await pipe.submit(make_record())).status is Status.STORED
        proxy.restore()
        assert not redis_sync.sismember(BLACKLIST_SET, "+972501234567")
        checker = BlacklistChecker(store=pg_store, cache=cache, journal=journal, region="IL")
        assert await checker.check(["+972501234567"], strict=True) == [True]  # the view is behind: the store answers
        await keeper.round()  # re-asserts what the journal holds unstored, and applies the store's changes
        assert redis_sync.smismember(BLACKLIST_SET, ["+972501234567", "+972521234567"]) == [1, 1]
    await proxy.stop()


# --- one bad record never blocks the rest ----------------------------------------------------------------
def poisoned(number: str, **fields: object) -> OptOutRecord:
    """A record carrying what PostgreSQL cannot hold, as a foreign producer's bug would make it (the model
    cleans its fields on construction, so this goes around it)."""
    rec = make_record(number)
    return OptOutRecord.model_construct(**{**rec.__dict__, **fields})


async def test_a_record_postgres_refuses_is_stored_without_the_bad_field(
    pipeline: OptOutPipeline, pg_store: PostgresStore
) -> None:
    good = [make_record(f"+9725012{i:05d}") for i in range(20)]
    bad = poisoned("+972509999999", campaign_id="camp\x00nul")
    results = await asyncio.gather(*(pipeline.submit(r) for r in [*good[:10], bad, *good[10:]]))
    assert [r.status for r in results] == [Status.STORED] * 21
    assert await pg_store.blacklisted([r.phone_number or "" for r in good]) == {r.phone_number for r in good}
    [row] = await pg_store.history("+972509999999")
    assert row.campaign_id is None and "other fields dropped" in row.reason
    assert await pipeline.journal.depth() == 0


async def test_a_record_the_store_keeps_refusing_is_parked_and_blocks_nothing(
    pipeline: OptOutPipeline, pg_store: PostgresStore, redis_sync: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    bad = poisoned("+97250999\x009999")  # not even the number can be stored
    first = await pipeline.submit(bad)
    assert first.status is Status.REFUSED, "a refusal is not an outage: the CLI must not say 'store unavailable'"
    later = [make_record(f"+9725012{i:05d}") for i in range(5)]
    for rec in later:
        await pipeline.journal.append(rec)  # queued behind it, as after a restart
    caplog.set_level(logging.ERROR, "agent.pipeline")
    for _ in range(3):
        await Replayer(pipeline).drain()
    assert await pg_store.blacklisted([r.phone_number or "" for r in later]) == {r.phone_number for r in later}
    [parked] = await pipeline.journal.parked()
    assert parked.event_id == bad.event_id and parked.kind == "store" and parked.attempts >= 3
    assert sum("parked" in r.getMessage() for r in caplog.records) == 1, "logged once at ERROR"
    assert await pipeline.journal.depth() == 1
    assert await Replayer(pipeline).drain() == 0, "a parked record is not retried by every round"


# --- a journal that cannot be written ------------------------------------------------------------------------
async def test_journal_failure_writes_straight_to_store_and_redis(
    pg_store: PostgresStore, cache: RedisCache, redis_sync: redis.Redis, tmp_path: Path
) -> None:
    journal = Journal(tmp_path / "journal.db")
    await journal.open()
    await journal.close()  # every write now fails
    pipe = OptOutPipeline(journal=journal, store=pg_store, cache=cache)
    hung_up: list[bool] = []

    async def hang_up() -> HangupInfo:
        hung_up.append(True)
        return HangupInfo(method="ari", result="ok")

    result = await pipe.submit(make_record(), hang_up=hang_up)
    assert hung_up == [True] and result.status is Status.STORED
    assert await pg_store.blacklisted(["+972501234567"]) == {"+972501234567"}
    assert redis_sync.sismember(BLACKLIST_SET, "+972501234567")


async def test_neither_journal_nor_store_the_optout_is_held_until_one_of_them_takes_it(
    pg_store: PostgresStore, cache: RedisCache, tmp_path: Path
) -> None:
    from agent.errors import JournalError

    broken = Journal(tmp_path / "journal.db")
    await broken.open()
    await broken.close()  # every write now fails
    async with PostgresStore("postgresql://postgres@127.0.0.1:1/none", timeout=0.3) as dead:
        pipe = OptOutPipeline(journal=broken, store=dead, cache=cache)
        first, second = make_record("+972501234567"), make_record("+972521234567")
        for record in (first, second):
            with pytest.raises(JournalError, match="held in memory"):
                await pipe.submit(record)
        assert await pipe.retry_held() == 2, "still nowhere to put them"
    pipe.store = pg_store  # the store is back, the journal still broken: stored directly
    assert await pipe.retry_held() == 0
    assert await pg_store.blacklisted(["+972501234567", "+972521234567"]) == {"+972501234567", "+972521234567"}


async def test_an_optout_held_in_memory_goes_to_the_journal_when_it_is_back(
    pg_store: PostgresStore, cache: RedisCache, tmp_path: Path
) -> None:
    from agent.errors import JournalError

    broken = Journal(tmp_path / "broken.db")
    await broken.open()
    await broken.close()
    async with PostgresStore("postgresql://postgres@127.0.0.1:1/none", timeout=0.3) as dead:
        pipe = OptOutPipeline(journal=broken, store=dead, cache=cache)
        with pytest.raises(JournalError):
            await pipe.submit(make_record("+972501234567"))
        async with Journal(tmp_path / "journal.db") as journal:
            pipe.journal = journal
            assert await pipe.retry_held() == 0
            assert [r.phone_number for r in await journal.unstored(10)] == ["+972501234567"]
            pipe.store = pg_store
            assert await Replayer(pipe).drain() == 1
    assert await pg_store.blacklisted(["+972501234567"]) == {"+972501234567"}


def _mount_tiny_tmpfs(where: Path) -> bool:
    where.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(where)],
                          capture_output=True, check=False).returncode == 0


async def test_journal_on_a_full_disk_still_loses_no_optout(
    pg_store: PostgresStore, cache: RedisCache, tmp_path: Path
) -> None:
    disk = tmp_path / "disk"
    if shutil.which("mount") is None or not _mount_tiny_tmpfs(disk):
        pytest.fail("cannot mount a small tmpfs here (needs root): the full-disk case cannot be tried")
    try:
        async with Journal(disk / "journal.db") as journal:
            pipe = OptOutPipeline(journal=journal, store=pg_store, cache=cache)
            fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
            try:  # fill the disk to the last byte
                while os.write(fd, b"x" * 512):
                    pass
            except OSError:
                pass
            finally:
                os.close(fd)
            records = [make_record(f"+9725014{i:05d}", event_id=f"ev-full-{i}") for i in range(30)]
            results = await asyncio.gather(*(pipe.submit(r) for r in records))
            assert all(r.status is Status.STORED for r in results)
            assert not journal.healthy
        assert await pg_store.blacklisted([r.phone_number or "" for r in records]) == {r.phone_number for r in records}
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# --- identity, retention ------------------------------------------------------------------------------------
async def test_a_producer_event_id_reused_for_another_number_is_recorded_not_dropped(
    pipeline: OptOutPipeline, pg_store: PostgresStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "agent.pipeline")
    first = record_from_event(OptOutEvent(phoneNumber="+972501234567", eventId="producer-1"), origin=Origin.SNS,
                              region="IL")
    second = record_from_event(OptOutEvent(phoneNumber="+972521234567", eventId="producer-1"), origin=Origin.SNS,
                               region="IL")
    assert (await pipeline.submit(first)).status is Status.STORED
    assert (await pipeline.submit(second)).status is Status.STORED
    assert await pg_store.blacklisted(["+972501234567", "+972521234567"]) == {"+972501234567", "+972521234567"}
    assert any("used before for another number" in r.getMessage() for r in caplog.records)
    [row] = await pg_store.history("+972521234567")
    assert row.source_event_id == "producer-1"


async def test_retention_prunes_only_rows_stored_and_published(tmp_path: Path) -> None:
    from datetime import timedelta

    async with Journal(tmp_path / "j.db", publish=True) as j:
        done, unpublished, unstored = make_record("+972501234567"), make_record("+972501234568"), make_record()
        for rec in (done, unpublished, unstored):
            await j.append(rec)
        await j.mark([done.event_id, unpublished.event_id], StoreState.STORED)
        await j.mark([done.event_id], PublishState.PUBLISHED)
        assert await j.prune(timedelta(days=7)) == 0, "nothing is old enough yet"
        await asyncio.sleep(0.01)
        assert await j.prune(timedelta(0)) == 1
        assert {r.event_id for r in await j.unpublished()} == {unpublished.event_id, unstored.event_id}
        assert await j.depth() == 1


def test_stripped_keeps_the_required_fields_and_the_timings_and_drops_every_other_field() -> None:
    rec = make_record().model_copy(update={
        "source_event_id": "producer-1", "raw_number": "050-123", "digit": "9", "actor": "ops",
        "channel": {"name": "PJSIP/x"}, "hangup": HangupInfo(method="ari", result="error: the far end said x"),
        "journaled_at": datetime.now(UTC), "visible_at": datetime.now(UTC)})
    out = stripped(rec, "bad byte")
    for name, field in OptOutRecord.model_fields.items():
        if name in ("reason", "hangup"):
            continue
        if field.is_required() or name in KEPT_WHEN_STRIPPED:
            assert getattr(out, name) == getattr(rec, name), name
        else:
            assert getattr(out, name) == field.get_default(call_default_factory=True), name
    assert out.hangup is not None and out.hangup.result == "error" and out.hangup.method is None
    assert out.reason.endswith("other fields dropped, the store refused them: bad byte")
