"""Redis behind Sentinel: the agent finds the primary through REDIS_SENTINELS, and a failover whose new
primary missed the last writes is repaired by the keeper without a single "clear" for an opted-out number.
Real redis-server and redis-sentinel processes (tests/sentinel_rig.py)."""

from __future__ import annotations

import asyncio
import contextlib
from contextlib import AsyncExitStack
from pathlib import Path

import redis

from agent.constants import BLACKLIST_SET
from agent.core import open_core
from agent.pipeline import Status
from agent.settings import Settings
from tests.conftest import make_record
from tests.sentinel_rig import SERVICE, SentinelRig

A, B, C = "+972501234567", "+972521234567", "+972531234567"


async def until(predicate: object, within: float = 20.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        result = predicate() if callable(predicate) else predicate
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_a_failover_whose_new_primary_missed_writes_is_repaired_and_never_answered_clear(
    pg_dsn: str, tmp_path: Path
) -> None:
    rig = SentinelRig(tmp_path).start()
    settings = Settings(database_url=pg_dsn, redis_sentinels=rig.sentinels, redis_sentinel_service=SERVICE,
                        optout_default_region="IL", optout_journal_path=tmp_path / "journal.db",
                        cache_sync_interval_seconds=0.05, cache_lease_seconds=0.3)
    answers: list[tuple[str, bool | None]] = []
    stop = asyncio.Event()
    try:
        async with AsyncExitStack() as stack:
            core = await open_core(settings, stack)
            await core.store.migrate()
            assert core.keeper is not None and core.cache is not None
            keeper = asyncio.create_task(core.keeper.run())
            assert await until(lambda: core.keeper is not None and core.keeper.current), "never current"
            assert (await core.pipeline.submit(make_record(A))).status is Status.STORED
            rig.pause_replica()
            # Written to the primary only: C stored (its Redis write and the keeper's apply of it), and B
            # accepted while this agent's store write failed (journaled, pending in Redis).
            assert (await core.pipeline.submit(make_record(C))).status is Status.STORED
            b = make_record(B)
            await core.journal.append(b)
            await core.cache.write_optouts([b])
            primary = redis.Redis(port=rig.ports["primary"], decode_responses=True)
            assert primary.smismember(BLACKLIST_SET, [A, B, C]) == [1, 1, 1]
            primary.close()

            async def keep_checking() -> None:
                while not stop.is_set():
                    for strict in (False, True):
                        for number, answer in zip((A, B, C), await core.checker.check([A, B, C], strict=strict),
                                                  strict=True):
                            answers.append((number, answer))
                    await asyncio.sleep(0.02)

            checks = asyncio.create_task(keep_checking())
            await asyncio.to_thread(rig.fail_over_losing_writes)
            promoted = redis.Redis(port=rig.ports["replica"], decode_responses=True)
            assert await until(lambda: promoted.smismember(BLACKLIST_SET, [A, B, C]) == [1, 1, 1]), \
                "the keeper did not repair the new primary's view"
            assert await until(lambda: core.keeper is not None and core.keeper.current), "never current again"
            stop.set()
            await checks
            promoted.close()
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
    finally:
        stop.set()
        rig.stop()
    assert len(answers) > 30
    assert [a for a in answers if a[1] is False] == [], "a check answered clear for an opted-out number"
