"""Pre-dial check through Redis: batch throughput (target >= 100,000 numbers/s in batches of 1,000) and
one-number latency (target p99 <= 1 ms).

The set is built the way production builds it: numbers in a migrated store, the cache keeper rebuilding
the view from it and holding the lease. Every answer must be a real one: a check that answers "unknown"
(nobody could answer) or a wrong answer stops the benchmark with an error, never a figure.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.cache import RedisCache
from agent.constants import Source
from agent.lookup import BlacklistChecker
from agent.store_sqlite import SqliteStore
from tests.bench.common import machine, summary

REDIS = os.environ.get("REDIS_URL_TEST", "redis://127.0.0.1:6379/15")


class MeasuredErrors(SystemExit):
    def __init__(self, what: str) -> None:
        super().__init__(f"bench_precheck: {what}: the figures would measure errors, not answers")


def verify(numbers: list[str], answers: list[bool | None]) -> int:
    """Count blacklisted answers; raise when any is missing or wrong (even positions are listed)."""
    if any(a is None for a in answers):
        raise MeasuredErrors(f"{sum(a is None for a in answers)} of {len(answers)} checks had no answer")
    wrong = [n for n, a in zip(numbers, answers, strict=True) if a != (int(n[-8:]) % 2 == 0)]
    if wrong:
        raise MeasuredErrors(f"{len(wrong)} wrong answers (first {wrong[0]})")
    return sum(bool(a) for a in answers)


async def main() -> None:
    import redis.asyncio as aioredis

    from agent.keeper import CacheKeeper

    r = aioredis.Redis.from_url(REDIS)
    await r.flushdb()
    with tempfile.TemporaryDirectory() as tmp:
        async with RedisCache(REDIS) as cache, SqliteStore(Path(tmp) / "store.db") as store:
            await store.migrate()
            listed = [f"+9725{i:08d}" for i in range(0, 200_000, 2)]
            for i in range(0, len(listed), 20_000):
                await store.import_batch(listed[i : i + 20_000], added_at=datetime.now(UTC), reason="bench",
                                         source=Source.ADMIN_IMPORT, actor="bench")
            keeper = CacheKeeper(store=store, cache=cache, journal=None, lease=600.0)
            for _ in range(100):  # a rebuild, then its grace (the lease is held while writers re-assert)
                if await keeper.round():
                    break
                await asyncio.sleep(0.05)
            else:
                raise MeasuredErrors("the keeper did not make the view current")
            checker = BlacklistChecker(store=store, cache=cache, journal=None, region="IL")
            numbers = [f"+9725{i:08d}" for i in range(200_000)]
            t0 = time.perf_counter()
            hits = 0
            for i in range(0, len(numbers), 1000):
                part = numbers[i : i + 1000]
                hits += verify(part, await checker.check(part))
            elapsed = time.perf_counter() - t0
            print(f"machine: {machine()}")
            print(f"pre-dial check via Redis, batches of 1,000: {len(numbers) / elapsed:,.0f} numbers/s "
                  f"({hits} listed of {len(numbers)}, every answer checked)")
            t0 = time.perf_counter()
            normalised = checker.normalise(numbers[:20_000])
            print(f"  (normalising raw input to E.164 adds {(time.perf_counter() - t0) / 20_000 * 1e6:.1f} us per "
                  "number)")
            single: list[float] = []
            for n in numbers[:5000]:
                t = time.perf_counter()
                answer = await checker.check([n])
                single.append((time.perf_counter() - t) * 1000)
                verify([n], answer)
            print(summary("one-number check", single))
            assert normalised
    await r.flushdb()
    await r.aclose()


if __name__ == "__main__":
    asyncio.run(main())
