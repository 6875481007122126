"""Pre-dial check through Redis: batch throughput (target >= 100,000 numbers/s in batches of 1,000) and
one-number latency (target p99 <= 1 ms)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.cache import RedisCache
from agent.constants import BLACKLIST_SET, BLACKLIST_SYNCED
from agent.precheck import BlacklistChecker
from agent.store_sqlite import SqliteStore
from tests.bench.common import machine, summary

REDIS = os.environ.get("REDIS_URL_TEST", "redis://127.0.0.1:6379/15")


async def main() -> None:
    async with RedisCache(REDIS) as cache, SqliteStore(Path("/tmp/bench-precheck.db")) as store:
        import redis.asyncio as aioredis

        r = aioredis.Redis.from_url(REDIS)
        await r.flushdb()
        listed = [f"+9725{i:08d}" for i in range(0, 200_000, 2)]
        for i in range(0, len(listed), 10_000):
            await r.sadd(BLACKLIST_SET, *listed[i : i + 10_000])
        await r.set(BLACKLIST_SYNCED, "1", px=600_000)  # the lease an agent's cache keeper would hold
        checker = BlacklistChecker(store=store, cache=cache, region="IL")
        numbers = [f"+9725{i:08d}" for i in range(200_000)]
        t0 = time.perf_counter()
        hits = 0
        for i in range(0, len(numbers), 1000):
            hits += sum(bool(a) for a in await checker.check(numbers[i : i + 1000]))
        elapsed = time.perf_counter() - t0
        print(f"machine: {machine()}")
        print(f"pre-dial check via Redis, batches of 1,000: {len(numbers) / elapsed:,.0f} numbers/s "
              f"({hits} listed of {len(numbers)})")
        t0 = time.perf_counter()
        normalised = checker.normalise(numbers[:20_000])
        print(f"  (normalising raw input to E.164 adds {(time.perf_counter() - t0) / 20_000 * 1e6:.1f} us per number)")
        single: list[float] = []
        for n in numbers[:5000]:
            t = time.perf_counter()
            await checker.check([n])
            single.append((time.perf_counter() - t) * 1000)
        print(summary("one-number check", single))
        assert normalised
        await r.flushdb()


if __name__ == "__main__":
    asyncio.run(main())
