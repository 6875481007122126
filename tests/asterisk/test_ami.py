"""The AMI agent against the real Asterisk sandbox and PostgreSQL: DTMFEnd in optout-plain-ivr ends the call."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

import pytest

from agent.ami import AmiAgent, facts_from_ami
from agent.ari import AriAgent
from agent.intake import Intake
from agent.store_postgres import PostgresStore
from tests.asterisk.test_agi import AsteriskCalls, random_number, wait_rows
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.asterisk

AMI_HOST = os.environ.get("AMI_HOST", "127.0.0.1")
AMI_PORT = int(os.environ.get("AMI_PORT", "5038"))
AMI_USER = os.environ.get("AMI_USERNAME", "optout")
AMI_SECRET = os.environ.get("AMI_SECRET", "")


async def until_connected(agent: AmiAgent, *, value: bool = True, within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while agent.connected is not value:
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"AMI agent connected stayed {agent.connected}")
        await asyncio.sleep(0.02)


async def running(agent: AmiAgent) -> asyncio.Task[None]:
    task = asyncio.create_task(agent.run(), name="ami-listener")
    await until_connected(agent)
    return task


def make_agent(intake: Intake, *, contexts: frozenset[str] = frozenset({"optout-plain-ivr"}),
               host: str = AMI_HOST, port: int = AMI_PORT, ping_interval: float = 5.0) -> AmiAgent:
    if not AMI_SECRET:
        pytest.fail("AMI_SECRET is not set: source .run/test.env")
    return AmiAgent(host=host, port=port, username=AMI_USER, secret=AMI_SECRET, contexts=contexts, intake=intake,
                    ping_interval=ping_interval, action_timeout=1.0)


@contextlib.asynccontextmanager
async def serving_ami(intake: Intake) -> AsyncIterator[AmiAgent]:
    """A connected AMI agent watching optout-plain-ivr; its presses are drained on the way out."""
    async with make_agent(intake) as agent:
        task = await running(agent)
        try:
            yield agent
        finally:
            await intake.drain(within=5.0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


@pytest.fixture
async def ami(intake: Intake) -> AsyncIterator[AmiAgent]:
    async with serving_ami(intake) as agent:
        yield agent


@pytest.mark.parametrize("via", ["sip", "local"])
async def test_nine_in_plain_ivr_is_hung_up_over_ami_and_recorded(
    via: str, ami: AmiAgent, calls: AsteriskCalls, pg_store: PostgresStore
) -> None:
    number = random_number()
    call = await calls.wait(await calls.place(number, press="9", ivr="plain", via=via, campaign_id="camp-ami"),
                            within=8)
    assert call.pressed_at is not None, call
    assert call.hangup_requested_at is not None, "the agent did not hang the IVR channel up"
    assert call.press_to_hangup_ms is not None
    assert call.press_to_hangup_ms < 2000
    [row] = await wait_rows(pg_store, number)
    assert (row.origin, row.digit, row.call_id, row.campaign_id, row.contact_id) == (
        "ami", "9", call.call_id, "camp-ami", f"contact-{call.call_id}")
    assert (row.hangup_method, row.hangup_result) == ("ami", "ok")
    assert row.pressed_at is not None and row.hungup_at is not None
    assert await pg_store.blacklisted([number]) == {number}


async def test_other_digit_in_plain_ivr_records_nothing(
    ami: AmiAgent, calls: AsteriskCalls, pg_store: PostgresStore
) -> None:
    number = random_number()
    call = await calls.wait(await calls.place(number, press="5", ivr="plain", hold=1), within=6, hung_up=False)
    assert call.digits == ["5"]
    await asyncio.sleep(0.3)
    assert await pg_store.history(number) == []


async def test_second_press_makes_one_optout(ami: AmiAgent, calls: AsteriskCalls, pg_store: PostgresStore) -> None:
    number = random_number()
    await calls.wait(await calls.place(number, press="9w9", ivr="plain"), within=8)
    await asyncio.sleep(0.5)
    assert len(await wait_rows(pg_store, number)) == 1


async def test_a_context_not_watched_is_left_alone(
    intake: Intake, calls: AsteriskCalls, pg_store: PostgresStore
) -> None:
    async with make_agent(intake, contexts=frozenset({"some-other-ivr"})) as agent:
        task = await running(agent)
        number = random_number()
        call = await calls.wait(await calls.place(number, press="9", ivr="plain", hold=1), within=6,
                                hung_up=False)
        assert call.digits == ["9"]
        assert await pg_store.history(number) == []
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_ami_and_ari_on_the_same_press_make_one_optout(
    intake: Intake, ari_agent: AriAgent, calls: AsteriskCalls, pg_store: PostgresStore
) -> None:
    async with make_agent(intake, contexts=frozenset({"optout-ivr"})) as agent:
        task = await running(agent)
        number = random_number()
        call = await calls.wait(await calls.place(number, press="9", ivr="ari"), within=8)
        assert call.hangup_requested_at is not None
        await asyncio.sleep(1.0)
        rows = await wait_rows(pg_store, number)
        assert len(rows) == 1, rows
        assert rows[0].origin in ("ami", "ari")
        assert await pg_store.blacklisted([number]) == {number}
        await intake.drain(within=3.0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_connected_turns_false_when_ami_goes_silent_and_back_when_it_answers(intake: Intake) -> None:
    proxy = await TcpProxy(AMI_HOST, AMI_PORT).start()
    try:
        async with make_agent(intake, host="127.0.0.1", port=proxy.port, ping_interval=0.2) as agent:
            task = await running(agent)
            proxy.delay = 30.0  # the socket stays open but nothing comes back: only a checked ping notices
            await until_connected(agent, value=False, within=5.0)
            proxy.delay = 0.0
            proxy.cut()
            proxy.restore()
            await until_connected(agent, value=True, within=10.0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        await proxy.stop()


async def test_wrong_secret_never_reports_connected(intake: Intake) -> None:
    agent = AmiAgent(host=AMI_HOST, port=AMI_PORT, username=AMI_USER, secret="wrong-secret",
                     contexts=frozenset({"optout-plain-ivr"}), intake=intake, action_timeout=1.0)
    async with agent:
        task = asyncio.create_task(agent.run())
        await asyncio.sleep(1.5)
        assert not agent.connected
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_facts_from_a_dtmf_event_take_the_channel_variables() -> None:
    event = {"Event": "DTMFEnd", "Channel": "PJSIP/loopback-00000001", "Uniqueid": "1700000000.5",
             "Linkedid": "1700000000.4", "Context": "optout-plain-ivr", "Exten": "s", "CallerIDNum": "<unknown>",
             "ConnectedLineNum": "+12025550100", "Digit": "9", "Direction": "Received",
             "ChanVariable": ["CALL_ID=call-1", "CAMPAIGN_ID=camp-1", "CONTACT_ID=", "OPTOUT_NUMBER=+12025550123"]}
    facts = facts_from_ami(event)
    assert facts.uniqueid == "1700000000.5" and facts.linkedid == "1700000000.4"
    assert facts.variables == {"CALL_ID": "call-1", "CAMPAIGN_ID": "camp-1", "OPTOUT_NUMBER": "+12025550123"}
    assert facts.caller_number is None and facts.connected_number == "+12025550100"
