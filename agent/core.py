"""The opt-out core every process opens (agent, bridge, Lambda, CLI): journal, store, Redis, pipeline, pre-dial
check. No telephony code: importing this loads neither aioari nor panoramisk.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

from agent.backoff import Backoff
from agent.cache import RedisCache, connect
from agent.dial_guard import DialGuard
from agent.errors import StoreUnavailable
from agent.journal import Journal
from agent.keeper import CacheKeeper
from agent.lookup import BlacklistChecker
from agent.pipeline import OptOutPipeline
from agent.settings import Settings
from agent.store import Store
from agent.store_postgres import PostgresStore
from agent.store_sqlite import SqliteStore

log = logging.getLogger("agent.core")


@dataclass
class Core:
    """The opt-out core, open: what every entry point calls."""

    settings: Settings
    store: Store
    cache: RedisCache | None
    keeper: CacheKeeper | None
    journal: Journal
    pipeline: OptOutPipeline
    checker: BlacklistChecker
    guard: DialGuard


def make_store(settings: Settings, *, create: bool = True) -> Store:
    """The configured store. `create=False`: the embedded file must exist already (readers)."""
    if settings.database_url is not None:
        return PostgresStore(settings.database_url.get_secret_value(), pool_size=settings.db_pool_size)
    return SqliteStore(settings.db_path, create=create)


async def open_core(
    settings: Settings, stack: AsyncExitStack, *, publish: bool = False, on_stored: Callable[[], None] | None = None,
    create_store: bool = True,
) -> Core:
    """Open the journal, store and cache (closed by `stack`); `publish` keeps journal rows for the SNS outbox."""
    journal = await stack.enter_async_context(
        Journal(settings.journal_path, publish=publish, sync=settings.optout_journal_sync))
    store = await stack.enter_async_context(make_store(settings, create=create_store))
    cache = keeper = None
    if settings.redis_dsn is not None or settings.sentinels:
        client = connect(settings.redis_dsn, sentinels=settings.sentinels, service=settings.redis_sentinel_service)
        cache = await stack.enter_async_context(RedisCache(client=client))
        interval = settings.cache_sync_interval_seconds
        keeper = CacheKeeper(store=store, cache=cache, journal=journal, interval=interval,
                             lease=settings.cache_lease_seconds, grace=max(1.0, 4 * interval))
    pipeline = OptOutPipeline(journal=journal, store=store, cache=cache, on_stored=on_stored)
    checker = BlacklistChecker(store=store, cache=cache, journal=journal, region=settings.optout_default_region)
    guard = DialGuard(checker=checker, store=store)
    return Core(settings, store, cache, keeper, journal, pipeline, checker, guard)


async def supervised(name: str, run: Callable[[], Awaitable[None]]) -> None:
    """Run a background task; an unexpected error is logged and the task restarted with backoff, so one
    broken part (a library raising something new) never takes the whole process down with it."""
    backoff = Backoff(f"task {name}", initial=0.5, maximum=10.0, logger=log)
    while True:
        try:
            await run()
            return
        except Exception:
            log.exception("background task %s failed; restarting it", name)
            await asyncio.sleep(backoff.delay())


async def migrate_until_done(store: Store) -> None:
    """Create/upgrade the schema, retrying while the store is down (the journal holds opt-outs meanwhile)."""
    backoff = Backoff("store migration", initial=0.5, maximum=10.0, logger=log)
    while True:
        try:
            applied = await store.migrate()
            if applied:
                log.info("schema migrations applied: %s", ", ".join(applied))
            return
        except StoreUnavailable as exc:
            await asyncio.sleep(backoff.delay(exc))


async def drain_inflight(pipeline: OptOutPipeline, *, within: float) -> None:
    """Wait until the pipeline has nothing in flight (what is left stays journaled for the next start)."""
    deadline = asyncio.get_running_loop().time() + within
    while pipeline.inflight and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110 - polls a set
        await asyncio.sleep(0.02)
    if pipeline.inflight:
        log.warning("%d opt-outs still in flight at shutdown; they stay journaled", len(pipeline.inflight))
