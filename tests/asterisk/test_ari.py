"""The ARI agent on a real Asterisk: press 9, the call ends, the number is blacklisted."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import redis

from agent.ari import AriAgent, Channel
from agent.constants import BLACKLIST_SET
from agent.http import AgentHttp
from agent.store import ActionRow
from agent.store_postgres import PostgresStore
from agent.telephony import ChannelFacts
from agent.testcall import CallObserver
from tests.asterisk.conftest import AriEnv, eventually, sandbox, wait_connected


def unique_number() -> str:
    return f"+97250{uuid.uuid4().int % 10_000_000:07d}"


async def history(store: PostgresStore, number: str) -> list[ActionRow]:
    return await store.history(number)


async def test_sip_call_pressing_9_is_hung_up_and_blacklisted(
    ari_agent: AriAgent, observer: CallObserver, pg_store: PostgresStore, redis_sync: redis.Redis
) -> None:
    number = unique_number()
    call = await observer.wait(await observer.place(number, press="9", via="sip"), timeout=15)
    assert call.hung_up, "the agent did not hang the call up"
    assert call.pressed_at is not None and call.press_to_hangup_ms is not None
    rows = await eventually(lambda: history(pg_store, number))
    assert len(rows) == 1
    row = rows[0]
    assert row.origin == "ari" and row.outcome == "blacklisted" and row.digit == "9"
    assert row.call_id == call.call_id and row.campaign_id == "test-campaign"
    assert row.pressed_at == call.pressed_at  # Asterisk's own press timestamp
    assert row.hungup_at is not None and row.hangup_method == "ari" and row.hangup_result == "ok"
    assert await pg_store.blacklisted([number]) == {number}
    assert redis_sync.sismember(BLACKLIST_SET, number)


async def test_other_digit_records_nothing_and_call_continues(
    ari_agent: AriAgent, observer: CallObserver, pg_store: PostgresStore
) -> None:
    number = unique_number()
    call = await observer.place(number, press="5", via="sip")
    await observer.wait(call, timeout=4)
    assert call.digits == ["5"]
    assert not call.hung_up
    assert call.ivr_channel is not None and await observer.channel_exists(call.ivr_channel)
    assert await history(pg_store, number) == []
    await observer.hangup_all(call)


async def test_second_press_records_one_optout(
    ari_agent: AriAgent, observer: CallObserver, pg_store: PostgresStore
) -> None:
    number = unique_number()
    call = await observer.wait(await observer.place(number, press="99", via="local"), timeout=15)
    assert call.hung_up
    await asyncio.sleep(0.5)
    assert len(await history(pg_store, number)) == 1


async def test_no_derivable_number_still_hangs_up_and_audits_number_unknown(
    ari_agent: AriAgent, observer: CallObserver, pg_store: PostgresStore
) -> None:
    campaign = f"camp-{uuid.uuid4().hex[:8]}"
    call = await observer.wait(await observer.place("", press="9", via="local", campaign_id=campaign), timeout=15)
    assert call.hung_up

    async def rows() -> list[ActionRow]:
        return [r async for r in pg_store.actions(campaign_id=campaign)]

    [row] = await eventually(rows)
    assert row.outcome == "number_unknown" and row.phone_number is None
    assert row.channel["uniqueid"] == call.ivr_channel


async def test_fifty_concurrent_sip_calls_each_pressing_9(
    ari_agent: AriAgent, observer: CallObserver, pg_store: PostgresStore, redis_sync: redis.Redis
) -> None:
    numbers = [unique_number() for _ in range(50)]
    calls = await asyncio.gather(*(observer.place(n, press="9", via="sip") for n in numbers))
    await asyncio.gather(*(observer.wait(c, timeout=30) for c in calls))
    assert sum(c.hung_up for c in calls) == 50, [(c.call_id, c.digits, c.ivr_channel) for c in calls if not c.hung_up]

    async def stored() -> bool:
        return len(await pg_store.blacklisted(numbers)) == 50

    assert await eventually(stored, within=10), f"stored {len(await pg_store.blacklisted(numbers))} of 50"
    assert all(redis_sync.smismember(BLACKLIST_SET, numbers))
    for c in calls:
        assert c.ivr_channel is not None and not await observer.channel_exists(c.ivr_channel)


async def test_bad_events_are_skipped_and_the_agent_keeps_working(
    ari_agent: AriAgent, observer: CallObserver, pg_store: PostgresStore
) -> None:
    for bad in [
        {"type": "SomethingNew", "timestamp": "x"},
        {"type": "ChannelDtmfReceived"},
        {"type": "ChannelDtmfReceived", "digit": "9", "channel": {"name": "no id"}, "timestamp": "garbage"},
        {"type": "StasisEnd", "channel": {"id": "never-seen"}, "timestamp": "2026-01-01T00:00:00.000+0000"},
        {"type": "StasisStart"},
        {"no": "type"},
        "not even a dict",
    ]:
        ari_agent._on_event(bad)
    assert ari_agent.connected
    number = unique_number()
    call = await observer.wait(await observer.place(number, press="9", via="local"), timeout=15)
    assert call.hung_up
    assert await eventually(lambda: history(pg_store, number))


async def test_hangup_endpoint_hangs_up_by_call_id(
    ari_agent: AriAgent, observer: CallObserver, unused_tcp_port: int
) -> None:
    token = "t0ken-long-enough-to-count"
    async with AgentHttp(host="127.0.0.1", port=unused_tcp_port, readiness=lambda: {"ari": ari_agent.connected},
                         hang_up_call=ari_agent.hang_up_call, api_token=token):
        call = await observer.place(unique_number(), press="", via="local")
        tracked = await eventually(
            lambda: asyncio.sleep(0, any(c.facts.var("CALL_ID") == call.call_id
                                         for c in ari_agent._channels.values())))
        assert tracked
        base = f"http://127.0.0.1:{unused_tcp_port}"
        async with httpx.AsyncClient() as client:
            assert (await client.post(f"{base}/calls/{call.call_id}/hangup")).status_code == 401
            bad = await client.post(f"{base}/calls/{call.call_id}/hangup", headers={"Authorization": "Bearer x"})
            assert bad.status_code == 401
            latin1 = await client.post(f"{base}/calls/{call.call_id}/hangup",
                                       headers=[(b"Authorization", b"Bearer \xe9t\xe9")])
            assert latin1.status_code == 401
            auth = {"Authorization": f"Bearer {token}"}
            assert (await client.post(f"{base}/calls/nope/hangup", headers=auth)).status_code == 404
            ok = await client.post(f"{base}/calls/{call.call_id}/terminate", headers=auth)  # the old name
            assert ok.status_code == 200
            assert (await client.get(f"{base}/ready")).json()["ready"] is True
        await observer.wait(call, timeout=10)
        assert call.hung_up


async def test_a_failed_hangup_request_is_a_502_not_a_500(ari_env: AriEnv, intake: Any, unused_tcp_port: int) -> None:
    agent = AriAgent(url="http://127.0.0.1:1", username="u", password="p", app="none", intake=intake)
    async with agent:
        agent._channels["c1"] = Channel("c1", ChannelFacts(uniqueid="c1", variables={"CALL_ID": "call-9"}))
        token = "t0ken-long-enough-to-count"
        async with AgentHttp(host="127.0.0.1", port=unused_tcp_port, readiness=dict, hang_up_call=agent.hang_up_call,
                             api_token=token), httpx.AsyncClient() as client:
            answer = await client.post(f"http://127.0.0.1:{unused_tcp_port}/calls/call-9/hangup",
                                       headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 502 and "error" in answer.json()


async def test_agent_reconnects_after_asterisk_restarts(
    ari_env: AriEnv, ari_agent: AriAgent, pg_store: PostgresStore
) -> None:
    assert sandbox("down").returncode == 0
    for _ in range(100):
        if not ari_agent.connected:
            break
        await asyncio.sleep(0.05)
    assert not ari_agent.connected
    up = await asyncio.to_thread(sandbox, "up")
    assert up.returncode == 0, up.stderr
    await wait_connected(ari_agent, within=10)
    async with CallObserver(ari_url=ari_env.url, username=ari_env.username, password=ari_env.password) as obs:
        number = unique_number()
        call = await obs.wait(await obs.place(number, press="9", via="sip"), timeout=15)
        assert call.hung_up
    assert await eventually(lambda: history(pg_store, number))


async def test_a_press_with_an_unexpected_timestamp_is_still_hung_up_and_stored(
    ari_agent: AriAgent, observer: CallObserver, pg_store: PostgresStore
) -> None:
    for stamp, number in (("2026-11-25T12:25:11+0000", unique_number()), ("garbage", unique_number())):
        call = await observer.place(number, press="", via="local")
        chan = await eventually(lambda call=call: asyncio.sleep(0, next(
            (c for c in ari_agent._channels.values() if c.facts.var("CALL_ID") == call.call_id), None)))
        assert chan is not None
        channel = {"id": chan.id, "name": chan.facts.name, "channelvars": chan.facts.variables}
        ari_agent._on_event({"type": "ChannelDtmfReceived", "digit": "9", "timestamp": stamp, "channel": channel})
        await observer.wait(call, timeout=10)
        assert call.hung_up, stamp
        [row] = await eventually(lambda number=number: history(pg_store, number))
        assert row.outcome == "blacklisted" and row.pressed_at is not None
