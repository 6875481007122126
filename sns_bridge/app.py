"""The bridge's composition root (`optout bridge`): SNS-originated opt-outs into the pipeline.

Opens the core (journal, store, Redis) and runs, until SIGTERM/SIGINT: the HTTP endpoint when
BRIDGE_HTTP_PORT is not 0, the SQS poller when BRIDGE_SQS_QUEUE_URL is set, the journal Replayer, the cache
keeper, the health checks and housekeeping. Imports no telephony code.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import AsyncExitStack
from datetime import timedelta

import httpx
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from agent.core import Core, drain_inflight, migrate_until_done, open_core, supervised
from agent.errors import ConfigError
from agent.health import Health
from agent.housekeeping import Housekeeping
from agent.pipeline import Replayer
from agent.settings import Settings
from sns_bridge.handler import BridgeHandler, MessageIdDedupe
from sns_bridge.hangup import WorkerHangup
from sns_bridge.http import BridgeHttp
from sns_bridge.sqs import SqsPoller
from sns_bridge.verify import HttpCertificateSource, SnsVerifier, certificate_client

log = logging.getLogger("sns_bridge.app")

SQS_WAIT_SECONDS = 20


async def run_bridge(settings: Settings) -> int:
    """Run the bridge until SIGTERM/SIGINT; returns the exit code. Raises ConfigError on unusable settings."""
    if settings.bridge_http_port == 0 and not settings.bridge_sqs_queue_url:
        raise ConfigError("the bridge has no way in: set BRIDGE_HTTP_PORT (not 0) or BRIDGE_SQS_QUEUE_URL")
    if settings.bridge_http_port != 0 and not settings.topic_allow_list:
        raise ConfigError("BRIDGE_TOPIC_ARNS must list the topic ARNs the HTTP endpoint accepts (comma-separated)")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await _serve(settings, stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("bridge stopped")
    return 0


async def open_handler(settings: Settings, core: Core, stack: AsyncExitStack) -> BridgeHandler:
    """The one handler every way in (HTTP, SQS, Lambda) calls, with its worker client closed by `stack`."""
    worker = None
    if settings.asterisk_worker_url:
        worker_client = await stack.enter_async_context(httpx.AsyncClient())
        token = settings.bridge_worker_token.get_secret_value() if settings.bridge_worker_token else None
        worker = WorkerHangup(base_url=settings.asterisk_worker_url, token=token, client=worker_client)
    else:
        log.info("ASTERISK_WORKER_URL is not set: SNS opt-outs are stored without ending calls")
    return BridgeHandler(pipeline=core.pipeline, region=settings.optout_default_region,
                         dedupe=MessageIdDedupe(redis=None if core.cache is None else core.cache.client), worker=worker)


async def _serve(settings: Settings, stop: asyncio.Event) -> None:
    async with AsyncExitStack() as stack:
        core = await open_core(settings, stack)
        handler = await open_handler(settings, core, stack)
        if settings.bridge_http_port != 0:
            sns_client = await stack.enter_async_context(certificate_client())
            certificates = await stack.enter_async_context(HttpCertificateSource(sns_client))
            verifier = SnsVerifier(
                allowed_topic_arns=settings.topic_allow_list, certificates=certificates,
                max_age=timedelta(seconds=settings.bridge_max_message_age_seconds),
            )
            await stack.enter_async_context(
                BridgeHttp(
                    handler=handler, verifier=verifier, client=sns_client, host=settings.bridge_http_host,
                    port=settings.bridge_http_port, max_body_bytes=settings.bridge_max_body_bytes,
                )
            )
        poller = None
        if settings.bridge_sqs_queue_url:
            config = AioConfig(
                connect_timeout=2.0, read_timeout=SQS_WAIT_SECONDS + 5.0,
                retries={"mode": "standard", "max_attempts": 3},
            )
            sqs = await stack.enter_async_context(
                get_session().create_client(
                    "sqs", region_name=settings.aws_region, endpoint_url=settings.aws_endpoint_url, config=config
                )
            )
            poller = SqsPoller(
                handler=handler, client=sqs, queue_url=settings.bridge_sqs_queue_url,
                allowed_topic_arns=settings.topic_allow_list, wait_seconds=SQS_WAIT_SECONDS,
            )
        replayer = Replayer(core.pipeline, interval=settings.replay_interval_seconds)
        health = Health(core, on_store_back=replayer.wake, interval=settings.health_interval_seconds)
        upkeep = Housekeeping(journal=core.journal, store=core.store,
                              retention=timedelta(days=settings.optout_journal_retention_days))
        async with asyncio.TaskGroup() as tg:
            named = {"journal-replayer": replayer.run, "store-migrate": lambda: migrate_until_done(core.store),
                     "health": health.run, "housekeeping": upkeep.run}
            if core.keeper is not None:
                named["cache-keeper"] = core.keeper.run
            tasks = [tg.create_task(supervised(name, run), name=name) for name, run in named.items()]
            intake = None
            if poller is not None:
                intake = tg.create_task(supervised("sqs-poller", poller.run), name="sqs-poller")
            log.info("bridge running", extra={"http": settings.bridge_http_port != 0, "sqs": poller is not None})
            await stop.wait()
            log.info("stopping: finishing in-flight opt-outs")
            if intake is not None:
                intake.cancel()  # stop taking new work first
            await drain_inflight(core.pipeline, within=5.0)
            for task in tasks:
                task.cancel()
