"""Scenarios 9-11: the dialers' view under the faults of issue 19, with the agent running as a process.

9, test_sentinel_failover_that_lost_writes: the agent finds Redis through three Sentinels. A writer adds
  numbers; the replica is paused and more are added (their Redis writes, and the keeper's, reach the primary
  only); the primary is killed and the Sentinels promote the replica that missed them. A dialer checks every
  opted-out number throughout (strict and not): never clear; the view is repaired on the new primary.
10, test_store_restored_from_an_earlier_dump: a dump is taken, more numbers are added, the view is current;
  the database is restored from the dump while the agent runs, and numbers are imported that reuse the
  sequences the view had passed. Never clear for any opted-out number (the ones the restore lost are written
  back from the view); the new ones are visible.
11, test_redis_less_writer_window: a writer without Redis commits numbers one at a time, while the agent's
  keeper (pushed by PostgreSQL NOTIFY) applies them: the time from each commit to the number in the view
  (what a non-strict check answers "blacklisted" from), p50/p99, alone and during a bulk import.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import redis.asyncio as aioredis

from agent.cache import RedisCache, connect
from agent.constants import BLACKLIST_SET, Source
from agent.core import open_core
from agent.journal import Journal
from agent.lookup import BlacklistChecker
from agent.pipeline import OptOutPipeline, Status
from agent.settings import Settings
from agent.store_postgres import PostgresStore
from tests.conftest import PG_BASE, make_record
from tests.faults.conftest import AgentFactory
from tests.faults.harness import FIGURES, REPO, RedisServer, eventually, numbers, redis_synced, start_agent
from tests.sentinel_rig import SERVICE, SentinelRig


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def report(line: str) -> None:
    FIGURES.append(line)
    print(line)


class Dialer:
    """Pre-dial checks over and over (as a dialer's process: Redis and the store, no journal)."""

    def __init__(self, checker: BlacklistChecker) -> None:
        self.checker = checker
        self.numbers: list[str] = []
        self.rounds = 0
        self.unknown = 0
        self.clear: set[str] = set()
        self._stop = asyncio.Event()

    async def run(self) -> None:
        while not self._stop.is_set():
            wanted = list(self.numbers)
            if wanted:
                for strict in (False, True):
                    answers = await self.checker.check(wanted, strict=strict)
                    self.clear.update(n for n, a in zip(wanted, answers, strict=True) if a is False)
                    self.unknown += answers.count(None)
                self.rounds += 1
            await asyncio.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()


async def test_sentinel_failover_that_lost_writes(make_agent: AgentFactory, pg_dsn: str, tmp_path: Path) -> None:
    rig = SentinelRig(tmp_path).start()
    env = {"REDIS_URL": "", "REDIS_SENTINELS": rig.sentinels, "REDIS_SENTINEL_SERVICE": SERVICE,
           "CACHE_SYNC_INTERVAL_SECONDS": "0.1", "CACHE_LEASE_SECONDS": "0.4"}
    try:
        agent = make_agent(**env)
        await start_agent(agent, pg_dsn)
        primary = f"redis://127.0.0.1:{rig.ports['primary']}/0"
        assert await eventually(lambda: redis_synced(primary), within=20), "the agent never made the view current"
        settings = Settings(database_url=pg_dsn, redis_sentinels=rig.sentinels, redis_sentinel_service=SERVICE,
                            optout_default_region="IL", optout_journal_path=tmp_path / "writer.db",
                            cache_sync_interval_seconds=0.1, cache_lease_seconds=0.4)
        async with AsyncExitStack() as stack:
            writer = await open_core(settings, stack)  # a second writer (a bridge): its own journal and keeper
            assert writer.keeper is not None
            keeper = asyncio.create_task(writer.keeper.run())
            dialer = Dialer(BlacklistChecker(
                store=await stack.enter_async_context(PostgresStore(pg_dsn)),
                cache=await stack.enter_async_context(RedisCache(client=connect(
                    sentinels=settings.sentinels, service=SERVICE))), journal=None, region="IL"))
            before, after = numbers(50, first=3_000_000), numbers(40, first=3_100_000)
            for n in before:
                assert (await writer.pipeline.submit(make_record(n))).status is Status.STORED
                dialer.numbers.append(n)
            checks = asyncio.create_task(dialer.run())
            rig.pause_replica()
            for n in after:
                assert (await writer.pipeline.submit(make_record(n))).status is Status.STORED
                dialer.numbers.append(n)
            took = await asyncio.to_thread(rig.fail_over_losing_writes)
            promoted_at = time.monotonic()
            promoted: aioredis.Redis = aioredis.Redis(port=rig.ports["replica"], decode_responses=True)

            async def repaired() -> bool:
                return all(await promoted.smismember(BLACKLIST_SET, [*before, *after])) and \
                    await redis_synced(f"redis://127.0.0.1:{rig.ports['replica']}/0")

            fixed = await eventually(repaired, within=30, every=0.02)
            repaired_after = time.monotonic() - promoted_at
            await asyncio.sleep(1.0)
            dialer.stop()
            await checks
            await promoted.aclose()
            keeper.cancel()
    finally:
        rig.stop()
    report(f"[9 sentinel-failover] numbers={len(before) + len(after)} ({len(after)} written while the replica was "
           f"paused: never replicated); failover {took:.1f}s; view repaired and current "
           f"{repaired_after:.2f}s after the promotion; dialer checks {dialer.rounds} rounds, "
           f"clear-for-opted-out={len(dialer.clear)}, unknown={dialer.unknown}")
    assert fixed, "the keeper never repaired the new primary's view"
    assert not dialer.clear, sorted(dialer.clear)


async def test_store_restored_from_an_earlier_dump(
    make_agent: AgentFactory, pg_schema: str, pg_dsn: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    agent = make_agent(CACHE_SYNC_INTERVAL_SECONDS="0.1", CACHE_LEASE_SECONDS="1")
    await start_agent(agent, pg_dsn)
    early, later, fresh = numbers(20, first=4_000_000), numbers(30, first=4_100_000), numbers(25, first=4_200_000)
    dump = tmp_path / "backup.sql"
    async with PostgresStore(pg_dsn) as store, RedisCache(redis_server.url) as cache:
        for n in early:
            await store.write([make_record(n)])
        subprocess.run(["pg_dump", "--no-owner", "-n", pg_schema, "-f", str(dump), PG_BASE], check=True)
        for n in later:
            await store.write([make_record(n)])
        head_before = await store.head()
        assert await eventually(lambda: redis_synced(redis_server.url), within=20)
        dialer = Dialer(BlacklistChecker(store=store, cache=cache, journal=None, region="IL"))
        dialer.numbers = [*early, *later]
        checks = asyncio.create_task(dialer.run())
        await asyncio.sleep(0.5)
        # The database is restored from the earlier dump while the agent runs.
        with psycopg.connect(PG_BASE, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {pg_schema} CASCADE")
        restored_at = time.monotonic()
        subprocess.run(["psql", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(dump), PG_BASE], check=True,
                       capture_output=True)
    async with PostgresStore(pg_dsn) as store, RedisCache(redis_server.url) as cache:
        dialer.checker = BlacklistChecker(store=store, cache=cache, journal=None, region="IL")
        await store.import_batch(fresh, added_at=datetime.now(UTC), reason="bulk", source=Source.ADMIN_IMPORT,
                                 actor="alice")
        reused = await store.head() <= head_before
        dialer.numbers += fresh

        async def recovered() -> bool:
            return await store.blacklisted(later) == set(later) and await redis_synced(redis_server.url) and \
                all(a is True for a in await dialer.checker.check([*early, *later, *fresh], strict=True))

        done = await eventually(recovered, within=30, every=0.05)
        recovered_after = time.monotonic() - restored_at
        await asyncio.sleep(0.5)
        dialer.stop()
        await checks
    report(f"[10 store-restored] restored to change {len(early)} from {head_before} while the agent ran; "
           f"{len(fresh)} imported after (sequences reused: {reused}); {len(later)} opt-outs the restore lost written "
           f"back and the view current {recovered_after:.1f}s after the restore; dialer checks {dialer.rounds} rounds, "
           f"clear-for-opted-out={len(dialer.clear)}, unknown={dialer.unknown}")
    assert done, "the keeper did not recover the store's lost opt-outs and a current view"
    assert not dialer.clear, sorted(dialer.clear)


async def test_redis_less_writer_window(
    make_agent: AgentFactory, pg_dsn: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    agent = make_agent()  # the defaults: a round every 0.25 s, pushed at every commit
    await start_agent(agent, pg_dsn)
    assert await eventually(lambda: redis_synced(redis_server.url), within=20)
    client: aioredis.Redis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    figures: dict[str, list[float]] = {}
    async with PostgresStore(pg_dsn) as store, Journal(tmp_path / "writer.db") as journal:
        writer = OptOutPipeline(journal=journal, store=store, cache=None)

        async def measure(label: str, batch: list[str]) -> None:
            waits = figures.setdefault(label, [])
            for n in batch:
                assert (await writer.submit(make_record(n))).status is Status.STORED
                committed = time.perf_counter()
                while not await client.sismember(BLACKLIST_SET, n):
                    if time.perf_counter() - committed > 10:
                        break
                    await asyncio.sleep(0.0005)
                waits.append((time.perf_counter() - committed) * 1000)

        await measure("alone", numbers(200, first=5_000_000))
        path = tmp_path / "bulk.csv"
        path.write_text("phone\n" + "".join(f"+9725{i:08d}\n" for i in range(6_000_000, 6_300_000)))
        importer_env = {**agent.env, "OPTOUT_JOURNAL_PATH": str(tmp_path / "i.db")}
        bulk = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.cli", "import", str(path), env=importer_env, cwd=REPO,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        await asyncio.sleep(1.0)
        await measure("during a 300,000-number import", numbers(200, first=5_100_000))
        _, err = await bulk.communicate()
        assert bulk.returncode == 0, err.decode()[-500:]
    await client.aclose()
    parts = [f"{label}: p50 {statistics.median(w):.1f} ms, p99 {pct(w, 99):.1f} ms, max {max(w):.1f} ms"
             for label, w in figures.items()]
    report(f"[11 redis-less-writer] commit -> number in the view (a non-strict check answers blacklisted), "
           f"{sum(len(w) for w in figures.values())} commits; " + "; ".join(parts))
    assert all(max(w) < 10_000 for w in figures.values()), "a commit never reached the view"
