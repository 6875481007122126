"""The composition root: opens every resource in an AsyncExitStack and runs the agent's named tasks.

`open_core` is shared by the agent and the CLI (each its own process); `run_agent` is the agent.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

from agent.agi import AgiServer
from agent.ami import AmiAgent
from agent.ari import AriAgent
from agent.backoff import Backoff
from agent.cache import RedisCache
from agent.errors import StoreUnavailable
from agent.http import AgentHttp
from agent.journal import Journal
from agent.pipeline import OptOutPipeline, Replayer
from agent.precheck import BlacklistChecker, CacheReconciler
from agent.publisher import SnsPublisher
from agent.settings import Settings
from agent.store import Store
from agent.store_postgres import PostgresStore
from agent.store_sqlite import SqliteStore

log = logging.getLogger("agent.app")


@dataclass
class Core:
    """The opt-out core, open: what every entry point calls."""

    settings: Settings
    store: Store
    cache: RedisCache | None
    journal: Journal
    pipeline: OptOutPipeline
    checker: BlacklistChecker


def make_store(settings: Settings) -> Store:
    if settings.database_url is not None:
        return PostgresStore(settings.database_url.get_secret_value(), pool_size=settings.db_pool_size)
    return SqliteStore(settings.optout_db_path)


async def open_core(
    settings: Settings, stack: AsyncExitStack, *, publish: bool = False, on_stored: Callable[[], None] | None = None
) -> Core:
    """Open the journal, store and cache (closed by `stack`); `publish` keeps journal rows for the SNS outbox."""
    journal = await stack.enter_async_context(Journal(settings.optout_journal_path, publish=publish))
    store = await stack.enter_async_context(make_store(settings))
    cache = None
    if settings.redis_dsn is not None:
        cache = await stack.enter_async_context(RedisCache(settings.redis_dsn))
    pipeline = OptOutPipeline(journal=journal, store=store, cache=cache, on_stored=on_stored)
    checker = BlacklistChecker(store=store, cache=cache, region=settings.optout_default_region)
    return Core(settings, store, cache, journal, pipeline, checker)


async def supervised(name: str, run: Callable[[], Awaitable[None]]) -> None:
    """Run a background task; an unexpected error is logged and the task restarted with backoff, so one
    broken part (a library raising something new) never takes the whole agent down with it."""
    backoff = Backoff(f"task {name}", initial=0.5, maximum=10.0, logger=log)
    while True:
        try:
            await run()
            return
        except Exception:
            log.exception("background task %s failed; restarting it", name)
            await asyncio.sleep(backoff.delay())


def make_ari(settings: Settings, core: Core) -> AriAgent | None:
    """The ARI agent, when enabled and given a password (ARI_PASSWORD or ARI_PASSWORD_FILE)."""
    if not settings.ari_enabled:
        return None
    if settings.ari_password is None:
        log.error("ARI_PASSWORD (or ARI_PASSWORD_FILE) is not set: the ARI agent is off")
        return None
    return AriAgent(
        url=settings.ari_url, username=settings.ari_username, password=settings.ari_password.get_secret_value(),
        app=settings.ari_app, digit=settings.optout_digit, region=settings.optout_default_region,
        pipeline=core.pipeline, hangup_connections=settings.ari_hangup_connections,
    )


def make_agi(settings: Settings, core: Core) -> AgiServer | None:
    """The FastAGI server (routes `optout` and `precheck`), unless AGI_ENABLED is false."""
    if not settings.agi_enabled:
        return None
    return AgiServer(host=settings.agi_host, port=settings.agi_port, digit=settings.optout_digit,
                     region=settings.optout_default_region, pipeline=core.pipeline, checker=core.checker)


def make_ami(settings: Settings, core: Core) -> AmiAgent | None:
    """The AMI DTMF watcher, when AMI_HOST, AMI_USERNAME and AMI_SECRET are all set."""
    if not (settings.ami_host and settings.ami_username and settings.ami_secret):
        return None
    return AmiAgent(host=settings.ami_host, port=settings.ami_port, username=settings.ami_username,
                    secret=settings.ami_secret.get_secret_value(),
                    contexts=settings.ami_contexts or frozenset({"optout-plain-ivr"}),
                    digit=settings.optout_digit, region=settings.optout_default_region, pipeline=core.pipeline)


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


async def run_agent(settings: Settings) -> int:
    """Run the agent until SIGTERM/SIGINT; returns the exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with AsyncExitStack() as stack:
        publisher: SnsPublisher | None = None

        def nudge_publisher() -> None:
            if publisher is not None:
                publisher.wake()

        core = await open_core(settings, stack, publish=settings.optout_events_topic_arn is not None,
                               on_stored=nudge_publisher)
        publisher = await stack.enter_async_context(SnsPublisher(
            journal=core.journal, topic_arn=settings.optout_events_topic_arn, region=settings.aws_region,
            endpoint_url=settings.aws_endpoint_url,
        ))
        replayer = Replayer(core.pipeline, interval=settings.replay_interval_seconds)
        ready: dict[str, Callable[[], bool]] = {"journal": lambda: True}
        if core.cache is None:
            log.info("Redis not configured: the cache is off and pre-dial checks go to the store")
        ari = make_ari(settings, core)
        if ari is not None:
            await stack.enter_async_context(ari)
            ready["ari"] = lambda: ari.connected
        agi = make_agi(settings, core)
        if agi is not None:
            await stack.enter_async_context(agi)  # binds now: a taken port is an error at start
            ready["agi"] = lambda: agi.listening
        ami = make_ami(settings, core)
        if ami is not None:
            await stack.enter_async_context(ami)
            ready["ami"] = lambda: ami.connected
        await stack.enter_async_context(
            AgentHttp(
                host=settings.agent_http_host,
                port=settings.agent_http_port,
                readiness=lambda: {name: probe() for name, probe in ready.items()},
                terminate_call=ari.terminate_call if ari is not None else None,
                api_token=settings.agent_api_token.get_secret_value() if settings.agent_api_token else None,
            )
        )
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(supervised("store-migrate", lambda: migrate_until_done(core.store)),
                               name="store-migrate"),
                tg.create_task(supervised("journal-replayer", replayer.run), name="journal-replayer"),
                tg.create_task(supervised("sns-publisher", publisher.run), name="sns-publisher"),
            ]
            if core.cache is not None:
                reconciler = CacheReconciler(
                    store=core.store, cache=core.cache, interval=settings.reconcile_interval_seconds
                )
                tasks.append(tg.create_task(supervised("cache-reconciler", reconciler.run), name="cache-reconciler"))
            if ari is not None:
                tasks.append(tg.create_task(supervised("ari-listener", ari.run), name="ari-listener"))
            if ami is not None:
                tasks.append(tg.create_task(supervised("ami-listener", ami.run), name="ami-listener"))
            log.info("agent running", extra={"store": core.store.dialect, "redis": core.cache is not None})
            await stop.wait()
            log.info("stopping: finishing in-flight opt-outs")
            # Presses keep being honoured (hung up and journaled) while in-flight work finishes; only then
            # are the sockets closed, and what is still running gets a last short drain.
            intakes = [x for x in (ari, agi, ami) if x is not None]
            for intake in intakes:
                await intake.drain(within=5.0)
            for intake in intakes:
                await intake.stop_accepting()
            for intake in intakes:
                await intake.drain(within=2.0)
            await drain_inflight(core.pipeline, within=5.0)
            for task in tasks:
                task.cancel()
    log.info("agent stopped")
    return 0


async def drain_inflight(pipeline: OptOutPipeline, *, within: float) -> None:
    """Wait until the pipeline has nothing in flight (what is left stays journaled for the next start)."""
    deadline = asyncio.get_running_loop().time() + within
    while pipeline.inflight and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110 - polls a set
        await asyncio.sleep(0.02)
    if pipeline.inflight:
        log.warning("%d opt-outs still in flight at shutdown; they stay journaled", len(pipeline.inflight))
