"""Pipeline throughput with PostgreSQL + Redis, 50 concurrent submitters (target >= 2,000 opt-outs/s)."""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.cache import RedisCache
from agent.constants import Origin
from agent.journal import Journal
from agent.optout import OptOutRecord
from agent.pipeline import OptOutPipeline
from agent.store_postgres import PostgresStore
from tests.bench.common import machine, summary

PG = os.environ.get("DATABASE_URL_TEST", "postgresql://postgres@127.0.0.1:5432/optout_test")
REDIS = os.environ.get("REDIS_URL_TEST", "redis://127.0.0.1:6379/15")


async def flush(url: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    await client.flushdb()
    await client.aclose()


async def main(total: int = 10_000, concurrency: int = 50) -> None:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    dsn = f"{PG}?options=-csearch_path%3D{schema}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            async with Journal(Path(tmp) / "j.db") as journal, PostgresStore(dsn, pool_size=10) as store, \
                    RedisCache(REDIS) as cache:
                await store.migrate()
                await flush(REDIS)
                pipe = OptOutPipeline(journal=journal, store=store, cache=cache)
                records = [
                    OptOutRecord(event_id=f"bench-{i}-{uuid.uuid4().hex[:6]}", phone_number=f"+9725{i:08d}",
                                 call_id=f"call-{i}", campaign_id=f"camp-{i % 20}", origin=Origin.ARI, digit="9",
                                 pressed_at=datetime.now(UTC), received_at=datetime.now(UTC))
                    for i in range(total)
                ]
                queue: asyncio.Queue[OptOutRecord] = asyncio.Queue()
                for r in records:
                    queue.put_nowait(r)
                latencies: list[float] = []

                async def worker() -> None:
                    while not queue.empty():
                        rec = queue.get_nowait()
                        t0 = time.perf_counter()
                        await pipe.submit(rec)
                        latencies.append((time.perf_counter() - t0) * 1000)

                cpu0, t0 = time.process_time(), time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(concurrency)))
                elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
                stored = len(await store.blacklisted([r.phone_number or "" for r in records]))
                print(f"machine: {machine()}")
                print(f"pipeline (journal fsync + PostgreSQL + Redis), {concurrency} concurrent: {total} opt-outs in "
                      f"{elapsed:.2f}s = {total / elapsed:,.0f}/s; stored {stored}; agent CPU {cpu / total * 1e6:.0f} "
                      f"us per opt-out")
                print(summary("submit latency", latencies))
                await flush(REDIS)
    finally:
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000))
