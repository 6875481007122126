"""The agent's composition root: opens every resource in an AsyncExitStack and runs the named tasks.

Nothing else wires things together; only `python -m agent` / `optout run` import this module.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from datetime import timedelta

from agent import metrics
from agent.agi import AgiServer
from agent.ami import AmiAgent
from agent.ari import AriAgent
from agent.core import Core, drain_inflight, migrate_until_done, open_core, supervised
from agent.health import Health
from agent.housekeeping import Housekeeping
from agent.http import AgentHttp
from agent.intake import Intake
from agent.pipeline import Replayer
from agent.publisher import SnsPublisher
from agent.settings import Settings
from agent.speech import runtime as speech_runtime
from agent.speech.errors import SpeechUnavailable

log = logging.getLogger("agent.app")


def make_ari(settings: Settings, intake: Intake) -> AriAgent | None:
    """The ARI way in, when enabled and given a password (ARI_PASSWORD or ARI_PASSWORD_FILE)."""
    if not settings.ari_enabled:
        return None
    if settings.ari_password is None:
        log.error("ARI_PASSWORD (or ARI_PASSWORD_FILE) is not set: the ARI agent is off")
        return None
    return AriAgent(url=settings.ari_url, username=settings.ari_username,
                    password=settings.ari_password.get_secret_value(), app=settings.ari_app, intake=intake,
                    hangup_connections=settings.ari_hangup_connections)


def make_agi(settings: Settings, intake: Intake, core: Core) -> AgiServer | None:
    """The FastAGI server (scripts `optout` and `precheck`), unless AGI_ENABLED is false."""
    if not settings.agi_enabled:
        return None
    return AgiServer(host=settings.agi_host, port=settings.agi_port, intake=intake, guard=core.guard)


def make_ami(settings: Settings, intake: Intake) -> AmiAgent | None:
    """The AMI DTMF watcher, when AMI_HOST, AMI_USERNAME and AMI_SECRET are all set."""
    if not (settings.ami_host and settings.ami_username and settings.ami_secret):
        return None
    return AmiAgent(host=settings.ami_host, port=settings.ami_port, username=settings.ami_username,
                    secret=settings.ami_secret.get_secret_value(),
                    contexts=settings.ami_contexts or frozenset({"optout-plain-ivr"}), intake=intake)


async def watch_loop_lag(every: float = 0.1) -> None:
    """How late the event loop runs a timer: the agent's own share of press-to-hangup latency."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + every
        await asyncio.sleep(every)
        metrics.LOOP_LAG.observe(max(0.0, loop.time() - due))


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
        health = Health(core, on_store_back=replayer.wake, interval=settings.health_interval_seconds)
        upkeep = Housekeeping(journal=core.journal, store=core.store,
                              retention=timedelta(days=settings.optout_journal_retention_days))
        intake = Intake(pipeline=core.pipeline, digit=settings.optout_digit, region=settings.optout_default_region)
        ready: dict[str, Callable[[], bool]] = {"journal": lambda: health.journal_ok}
        if core.cache is None:
            log.info("Redis not configured: the cache is off and pre-dial checks go to the store")
        ari = make_ari(settings, intake)
        if ari is not None:
            await stack.enter_async_context(ari)
            ready["ari"] = lambda: ari.connected
        speech = None
        if speech_runtime.wanted(settings):
            if ari is None:
                log.error("spoken opt-out needs the ARI way in (ARI_ENABLED and ARI_PASSWORD): it is off")
            else:
                try:
                    speech = await speech_runtime.open_listener(
                        settings, stack, intake=intake, ari=ari, store=core.store,
                        publish=publisher.publish_one if publisher.enabled else None)
                except SpeechUnavailable as exc:
                    log.error("spoken opt-out is off: %s", exc)
        agi = make_agi(settings, intake, core)
        if agi is not None:
            await stack.enter_async_context(agi)  # binds now: a taken port is an error at start
            ready["agi"] = lambda: agi.listening
        ami = make_ami(settings, intake)
        if ami is not None:
            await stack.enter_async_context(ami)
            ready["ami"] = lambda: ami.connected

        def advisory() -> dict[str, bool]:
            info = {"store": health.store_ok}
            if core.keeper is not None:
                info["cache_current"] = core.keeper.current
            return info

        await stack.enter_async_context(AgentHttp(
            host=settings.agent_http_host, port=settings.agent_http_port,
            readiness=lambda: {name: probe() for name, probe in ready.items()}, advisory=advisory,
            hang_up_call=ari.hang_up_call if ari is not None else None,
            originate=ari.originate if ari is not None else None, guard=core.guard,
            api_token=settings.agent_api_token.get_secret_value() if settings.agent_api_token else None,
            dial_endpoint=settings.optout_dial_endpoint,
        ))
        async with asyncio.TaskGroup() as tg:
            named = {
                "store-migrate": lambda: migrate_until_done(core.store),
                "journal-replayer": replayer.run,
                "health": health.run,
                "housekeeping": upkeep.run,
                "loop-lag": watch_loop_lag,
            }
            if publisher.enabled:
                named["sns-publisher"] = publisher.run
            else:
                log.info("OPTOUT_EVENTS_TOPIC_ARN is not set: publishing opt-outs to SNS is off")
            if core.keeper is not None:
                named["cache-keeper"] = core.keeper.run
            if ari is not None:
                named["ari-listener"] = ari.run
            if speech is not None:
                named["speech-listener"] = speech.run
            if ami is not None:
                named["ami-listener"] = ami.run
            tasks = [tg.create_task(supervised(name, run), name=name) for name, run in named.items()]
            log.info("agent running", extra={"store": core.store.dialect, "redis": core.cache is not None,
                                             "journal_sync": settings.optout_journal_sync})
            await stop.wait()
            started = time.monotonic()
            log.info("stopping: finishing in-flight opt-outs")
            # Presses keep being honoured (journaled and hung up) while in-flight work finishes; only then
            # are the sockets closed, and what is still running gets a last short drain.
            ways_in = [x for x in (ari, agi, ami) if x is not None]
            await intake.drain(within=5.0)
            for way_in in ways_in:
                await way_in.stop_accepting()
            await intake.drain(within=2.0)
            await drain_inflight(core.pipeline, within=5.0)
            await core.guard.drain(within=1.0)
            for task in tasks:
                task.cancel()
    log.info("agent stopped", extra={"shutdown_s": round(time.monotonic() - started, 2)})
    return 0
