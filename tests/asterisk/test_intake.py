"""The press sequence exists once: ARI, AMI and FastAGI give the same order of effects in every scenario.

Each way in takes a real call through the sandbox (a Local-channel caller pressing 9 into its IVR). The
effects are recorded at seams we own (the journal's append, the protocol's hangup as the intake calls
it, the store's write), with real PostgreSQL and Redis behind them.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from agent.intake import Intake
from agent.pipeline import OptOutPipeline
from agent.store_postgres import PostgresStore
from tests.asterisk.conftest import AriEnv, serving_ari
from tests.asterisk.test_agi import AsteriskCalls, random_number, serving_agi
from tests.asterisk.test_ami import serving_ami

pytestmark = pytest.mark.asterisk

WAYS = ("ari", "ami", "agi")
IVR = {"ari": "ari", "ami": "plain", "agi": "agi"}


class Effects:
    """What happened, in order, for one test call."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def wrap(self, name: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapped(*args: Any, **kwargs: Any) -> Any:
            result = await fn(*args, **kwargs)
            self.seen.append(name)
            return result

        return wrapped


@pytest.fixture
def effects(intake: Intake, pipeline: OptOutPipeline) -> Effects:
    log = Effects()
    pipeline.journal.append = log.wrap("journal", pipeline.journal.append)  # type: ignore[method-assign]
    pipeline.store.write = log.wrap("store", pipeline.store.write)  # type: ignore[method-assign]
    press = intake.press

    def recording_press(facts: Any, *, hang_up: Any, **kwargs: Any) -> Any:
        return press(facts, hang_up=log.wrap("hangup", hang_up), **kwargs)

    intake.press = recording_press  # type: ignore[method-assign]
    return log


@pytest.fixture
async def way_in(request: pytest.FixtureRequest, ari_env: AriEnv, intake: Intake, pg_store: PostgresStore,
                 cache: Any) -> AsyncIterator[str]:
    way: str = request.param
    serving: contextlib.AbstractAsyncContextManager[Any]
    if way == "ari":
        serving = serving_ari(ari_env, intake)
    elif way == "ami":
        serving = serving_ami(intake)
    else:
        serving = serving_agi(intake, pg_store, cache)
    async with serving:
        yield way


async def press_once(calls: AsteriskCalls, way: str) -> str:
    number = random_number()
    call = await calls.wait(await calls.place(number, press="9", ivr=IVR[way], campaign_id=f"c-{uuid.uuid4().hex}"),
                            within=10)
    assert call.hangup_requested_at is not None, f"{way}: the call was not hung up"
    return number


@pytest.mark.parametrize("way_in", WAYS, indirect=True)
async def test_a_press_is_journaled_then_hung_up_then_stored(
    way_in: str, effects: Effects, intake: Intake, calls: AsteriskCalls, pg_store: PostgresStore
) -> None:
    number = await press_once(calls, way_in)
    await intake.drain(within=5.0)
    assert effects.seen == ["journal", "hangup", "store"]
    assert await pg_store.blacklisted([number]) == {number}


@pytest.mark.parametrize("way_in", WAYS, indirect=True)
async def test_a_journal_failure_still_hangs_up_then_stores_directly(
    way_in: str, effects: Effects, intake: Intake, pipeline: OptOutPipeline, calls: AsteriskCalls,
    pg_store: PostgresStore,
) -> None:
    await pipeline.journal.close()
    number = await press_once(calls, way_in)
    await intake.drain(within=5.0)
    assert effects.seen == ["hangup", "store"]
    assert await pg_store.blacklisted([number]) == {number}


@pytest.mark.parametrize("way_in", WAYS, indirect=True)
async def test_a_pipeline_failure_after_the_journal_still_hangs_up(
    way_in: str, effects: Effects, intake: Intake, pipeline: OptOutPipeline, calls: AsteriskCalls,
) -> None:
    async def broken(records: Any) -> Any:
        raise RuntimeError("a bug in the store")

    pipeline.store.write = broken  # type: ignore[method-assign]
    await press_once(calls, way_in)
    await intake.drain(within=5.0)
    assert effects.seen == ["journal", "hangup"]
    assert await pipeline.journal.depth() == 1, "the opt-out stays journaled for the replayer"


@pytest.mark.parametrize("way_in", WAYS, indirect=True)
async def test_sigterm_mid_press_lets_the_press_finish(
    way_in: str, effects: Effects, intake: Intake, pipeline: OptOutPipeline, calls: AsteriskCalls,
    pg_store: PostgresStore,
) -> None:
    write = pipeline.store.write

    async def slow(records: Any) -> Any:
        await asyncio.sleep(1.0)
        return await write(records)

    pipeline.store.write = slow  # type: ignore[method-assign]
    number = random_number()
    call = await calls.place(number, press="9", ivr=IVR[way_in])
    for _ in range(200):  # until the press is in flight
        if intake.inflight:
            break
        await asyncio.sleep(0.02)
    assert intake.inflight, "the press never reached the intake"
    await intake.drain(within=5.0)  # what the agent does on SIGTERM before it closes the sockets
    await calls.wait(call, within=5)
    assert call.hangup_requested_at is not None
    assert effects.seen == ["journal", "hangup", "store"]
    assert await pg_store.blacklisted([number]) == {number}
