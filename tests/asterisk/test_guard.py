"""The dial guard: `POST /calls` checks the number (failing closed) before it originates over ARI, and every
call it stops is counted and audited."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from agent.ari import AriAgent
from agent.cache import RedisCache
from agent.dial_guard import DialGuard
from agent.http import AgentHttp
from agent.lookup import BlacklistChecker
from agent.pipeline import OptOutPipeline
from agent.store import ActionRow
from agent.store_postgres import PostgresStore
from tests.asterisk.conftest import AriEnv, eventually
from tests.conftest import make_record

pytestmark = pytest.mark.asterisk

TOKEN = "guard-token-long-enough"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DIAL = "Local/{digits}@optout-test-dial"
"""OPTOUT_DIAL_ENDPOINT in the sandbox (dialplan/optout-test.conf: any number reaches the test caller)."""


@pytest.fixture
def originated() -> list[Any]:
    """Every originate the guard let through, in order."""
    return []


@pytest.fixture
async def api(ari_agent: AriAgent, pg_store: PostgresStore, cache: RedisCache, originated: list[Any],
              unused_tcp_port: int) -> AsyncIterator[str]:
    guard = DialGuard(checker=BlacklistChecker(store=pg_store, cache=cache, journal=None, region="IL"), store=pg_store)

    async def originate(*args: Any, **kwargs: Any) -> Any:
        originated.append((args, kwargs))
        return await ari_agent.originate(*args, **kwargs)

    async with AgentHttp(host="127.0.0.1", port=unused_tcp_port, readiness=dict, hang_up_call=ari_agent.hang_up_call,
                         originate=originate, guard=guard, api_token=TOKEN, dial_endpoint=DIAL):
        yield f"http://127.0.0.1:{unused_tcp_port}"
    await guard.drain(within=2.0)


def prevented(via: str) -> float:
    return REGISTRY.get_sample_value("optout_prevented_calls_total", {"via": via}) or 0.0


async def channels(ari_env: AriEnv) -> set[str]:
    async with httpx.AsyncClient(auth=(ari_env.username, ari_env.password)) as client:
        return {c["id"] for c in (await client.get(f"{ari_env.url}/ari/channels")).json()}


async def test_a_blacklisted_number_gets_409_and_no_channel_and_an_audit_row(
    api: str, ari_env: AriEnv, pipeline: OptOutPipeline, pg_store: PostgresStore, originated: list[Any]
) -> None:
    await pipeline.submit(make_record("+972501234567"))
    before, count = await channels(ari_env), prevented("ari")
    async with httpx.AsyncClient() as client:
        answer = await client.post(f"{api}/calls", headers=AUTH, json={
            "number": "050-123-4567", "callId": "guard-1", "campaignId": "camp-g"})
    assert answer.status_code == 409 and answer.json()["error"] == "blacklisted"
    assert originated == [], "no call may be originated for a blacklisted number"
    assert await channels(ari_env) == before

    async def prevented_rows() -> list[ActionRow]:
        return [r for r in await pg_store.history("+972501234567") if r.outcome == "prevented"]

    rows = await eventually(prevented_rows, within=5.0)  # the audit row is written after the answer
    assert prevented("ari") == count + 1
    assert len(rows) == 1 and rows[0].call_id == "guard-1" and rows[0].campaign_id == "camp-g"


async def test_a_clear_number_is_originated_with_its_ids_and_number(
    api: str, ari_env: AriEnv, originated: list[Any]
) -> None:
    async with httpx.AsyncClient() as client:
        answer = await client.post(f"{api}/calls", headers=AUTH, json={
            "number": "0521234567", "campaignId": "camp-g", "contactId": "c-9",
            "variables": {"HOLD": "2", "PRESS": ""}})
        assert answer.status_code == 201, answer.text
        assert len(originated) == 1
        assert originated[0][0][0] == "Local/972521234567@optout-test-dial", "the endpoint of the checked number"
        body = answer.json()
        assert body["callId"] and body["channelId"]
        variable = await client.get(f"{ari_env.url}/ari/channels/{body['channelId']}/variable",
                                    params={"variable": "OPTOUT_NUMBER"}, auth=(ari_env.username, ari_env.password))
        assert variable.json()["value"] == "+972521234567"
        auth = (ari_env.username, ari_env.password)
        await client.delete(f"{ari_env.url}/ari/channels/{body['channelId']}", auth=auth)


@pytest.mark.parametrize(("body", "field"), [
    ({"number": "12", "endpoint": "Local/s@x"}, "field number:"),
    ({"number": "0521234567", "endpoint": "Local/s@optout-test-caller"}, "field endpoint:"),
    ({"number": "0521234567", "endpoint": "not an endpoint"}, "field endpoint:"),
    ({"number": "0521234567", "endpoint": "Local/s@x", "variables": {"OPTOUT_NUMBER": "+1"}}, "field variables:"),
    ({"number": "0521234567", "endpoint": "Local/s@x", "campaignId": "x\u0000"}, "field campaignId:"),
    ([1, 2], "body:"),
])
async def test_a_bad_body_gets_400_naming_the_field(api: str, body: Any, field: str) -> None:
    async with httpx.AsyncClient() as client:
        answer = await client.post(f"{api}/calls", headers=AUTH, json=body)
    assert answer.status_code == 400 and answer.json()["error"].startswith(field), answer.text


async def test_no_answer_from_the_blacklist_gets_503_and_no_call(
    ari_agent: AriAgent, ari_env: AriEnv, unused_tcp_port: int
) -> None:
    async with PostgresStore("postgresql://postgres@127.0.0.1:1/none", timeout=0.3) as dead:
        guard = DialGuard(checker=BlacklistChecker(store=dead, cache=None, journal=None, region="IL"), store=dead)
        before = await channels(ari_env)
        async with AgentHttp(host="127.0.0.1", port=unused_tcp_port, readiness=dict, originate=ari_agent.originate,
                             guard=guard, api_token=TOKEN, dial_endpoint=DIAL), httpx.AsyncClient() as client:
            answer = await client.post(f"http://127.0.0.1:{unused_tcp_port}/calls", headers=AUTH,
                                       json={"number": "0521234567"})
    assert answer.status_code == 503
    assert await channels(ari_env) == before


async def test_the_guard_needs_the_token(api: str) -> None:
    async with httpx.AsyncClient() as client:
        answer = await client.post(f"{api}/calls", json={"number": "0521234567", "endpoint": "Local/s@x"})
    assert answer.status_code == 401
