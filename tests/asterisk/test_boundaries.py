"""Issue 20 through the real Asterisk sandbox: a dialer's id, whatever it holds, cannot re-shape the FastAGI
arguments of the shipped dialplan (Asterisk's own argument parser splits them), and `POST /calls` takes only
identifiers that no parser downstream can split, and dials the number it checked."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from agent.agi import AgiServer
from agent.ari import AriAgent
from agent.cache import RedisCache
from agent.dial_guard import DialGuard
from agent.intake import Intake
from agent.pipeline import OptOutPipeline
from agent.store_postgres import PostgresStore
from tests.asterisk.conftest import AriEnv
from tests.asterisk.test_agi import AGI_HOST, AGI_PORT, AsteriskCalls, us_guard, wait_rows
from tests.asterisk.test_guard import AUTH, DIAL, TOKEN, channels
from tests.conftest import make_record

pytestmark = pytest.mark.asterisk

HOSTILE_IDS = [
    "spring,OPTOUT_NUMBER={injected}",  # the example
    'spring",OPTOUT_NUMBER={injected},"',  # closes a quote the dialplan might have opened
    "spring\\,OPTOUT_NUMBER={injected}",  # an escaped comma
    "spring(,OPTOUT_NUMBER={injected}",  # an unbalanced parenthesis swallows the next arguments
    "spring),OPTOUT_NUMBER={injected}",
    "spring[,OPTOUT_NUMBER={injected}",
    "spring\nagi_arg_9: OPTOUT_NUMBER={injected}",  # a line break starts a header of its own
    "spring\n\n200 result=1 ({injected})",  # ... or ends the headers and forges a reply
    "spring\r\nagi_arg_1: OPTOUT_NUMBER={injected}",
]


@pytest.fixture
async def agi(pipeline: OptOutPipeline, pg_store: PostgresStore, cache: RedisCache) -> AsyncIterator[Intake]:
    intake = Intake(pipeline=pipeline, digit="9", region="US")
    guard = us_guard(pg_store, cache)
    async with AgiServer(host=AGI_HOST, port=AGI_PORT, intake=intake, guard=guard):
        yield intake
        await intake.drain(within=5.0)
        await guard.drain(within=5.0)


async def place(calls: AsteriskCalls, variables: dict[str, str]) -> None:
    params = {"endpoint": "Local/s@optout-test-caller", "context": "optout-agi-ivr", "extension": "s",
              "priority": "1", "timeout": "30"}
    async with calls._http.post(f"{calls._ari.url}/ari/channels", params=params,
                                json={"variables": {"PRESS": "9", "HOLD": "5", **variables}}) as resp:
        assert resp.status == 200, await resp.text()


@pytest.mark.parametrize("field", ["CAMPAIGN_ID", "CALL_ID", "CONTACT_ID"])
async def test_no_dialer_id_can_name_another_number_through_the_shipped_dialplan(
    agi: Intake, calls: AsteriskCalls, pg_store: PostgresStore, field: str,
) -> None:
    """Each call's callee presses 9; the id tries every way Asterisk's AGI() argument parsing offers to put
    another number in the opt-out. Only the callee may be listed."""
    cases = []
    for i, template in enumerate(HOSTILE_IDS):
        callee, injected = f"+1202555{1000 + i:04d}", f"+1202555{9000 + i:04d}"
        ids = {"CALL_ID": f"t-{uuid.uuid4().hex[:10]}", "CAMPAIGN_ID": "camp", "CONTACT_ID": "contact"}
        ids[field] = template.format(injected=injected)
        cases.append((callee, injected))
        await place(calls, {"OPTOUT_NUMBER": callee, **ids})
    for callee, _ in cases:
        [row] = await wait_rows(pg_store, callee, within=15)
        assert row.origin == "agi" and row.phone_number == callee
        stored = getattr(row, field.lower())
        assert stored is None or not set(stored) & set(',"\\()[]\r\n'), stored
    listed = await pg_store.blacklisted([n for case in cases for n in case])
    assert listed == {callee for callee, _ in cases}, "a number the call did not dial was listed"


async def test_a_precheck_with_hostile_ids_still_blocks_and_audits_clean_ids(
    agi: Intake, calls: AsteriskCalls, pipeline: OptOutPipeline, pg_store: PostgresStore,
) -> None:
    number = f"+1202555{uuid.uuid4().int % 10000:04d}"
    await pipeline.submit(make_record(number))
    params = {"endpoint": f"Local/{number}@optout-outbound-example", "context": "optout-test-caller",
              "extension": "s", "priority": "1", "timeout": "10"}
    variables = {"HOLD": "1", "PRESS": "", "CALL_ID": "p,+12025550000\nx", "CAMPAIGN_ID": 'c"(', "CONTACT_ID": "k"}
    async with calls._http.post(f"{calls._ari.url}/ari/channels", params=params,
                                json={"variables": variables}) as resp:
        assert resp.status == 200, await resp.text()
    assert await calls.precheck_cause(number) == 21
    for _ in range(100):
        rows = [r for r in await pg_store.history(number) if r.outcome == "prevented"]
        if rows:
            break
        await asyncio.sleep(0.05)
    assert rows[0].call_id == "p+12025550000 x" and rows[0].campaign_id == "c", rows[0]


# --- POST /calls -----------------------------------------------------------------------------------------------------
@pytest.fixture
async def calls_api(ari_agent: AriAgent, pg_store: PostgresStore, cache: RedisCache,
                    unused_tcp_port: int) -> AsyncIterator[tuple[str, list[Any]]]:
    from agent.http import AgentHttp
    from agent.lookup import BlacklistChecker

    guard = DialGuard(checker=BlacklistChecker(store=pg_store, cache=cache, journal=None, region="US"), store=pg_store)
    originated: list[Any] = []

    async def originate(*args: Any) -> Any:
        originated.append(args)
        return await ari_agent.originate(*args)

    async with AgentHttp(host="127.0.0.1", port=unused_tcp_port, readiness=dict, hang_up_call=ari_agent.hang_up_call,
                         originate=originate, guard=guard, api_token=TOKEN, dial_endpoint=DIAL):
        yield f"http://127.0.0.1:{unused_tcp_port}", originated
    await guard.drain(within=2.0)


BAD_IDS = ["spring,OPTOUT_NUMBER=+12025559999", "a\rb", "a\nb", "a\r\nb", 'a"b', "a\\b", "a(b", "a]b", "a\tb",
           "a\u2028b", "a\x00b", "x" * 129, ""]


async def test_post_calls_refuses_an_id_a_parser_could_split_with_400(calls_api: tuple[str, list[Any]]) -> None:
    url, originated = calls_api
    async with httpx.AsyncClient() as client:
        for field in ("callId", "campaignId", "contactId"):
            for value in BAD_IDS:
                answer = await client.post(f"{url}/calls", headers=AUTH, json={"number": "+12025550123", field: value})
                assert answer.status_code == 400, (field, value, answer.text)
                assert answer.json()["error"].startswith(f"field {field}:"), answer.text
    assert originated == []


async def test_post_calls_refuses_a_variable_value_a_dialplan_could_split(calls_api: tuple[str, list[Any]]) -> None:
    url, originated = calls_api
    async with httpx.AsyncClient() as client:
        answer = await client.post(f"{url}/calls", headers=AUTH, json={
            "number": "+12025550123", "variables": {"PROMO": "x,OPTOUT_NUMBER=+12025559999"}})
        hangup = await client.post(f"{url}/calls/a,b/hangup", headers=AUTH)
    assert answer.status_code == 400 and answer.json()["error"].startswith("field variables:"), answer.text
    assert hangup.status_code == 400 and hangup.json()["error"].startswith("field callId:"), hangup.text
    assert originated == []


async def test_the_guard_dials_only_the_number_it_checked(calls_api: tuple[str, list[Any]], ari_env: AriEnv) -> None:
    url, originated = calls_api
    before = await channels(ari_env)
    async with httpx.AsyncClient() as client:
        for endpoint in ("PJSIP/+12025559999@trunk", "Local/12025559999@optout-test-dial",
                         "Local/s@optout-test-caller", "Local/12025550123@optout-test-dial/n"):
            answer = await client.post(f"{url}/calls", headers=AUTH, json={"number": "+12025550123",
                                                                           "endpoint": endpoint})
            assert answer.status_code == 400, (endpoint, answer.text)
            assert answer.json()["error"].startswith("field endpoint:"), answer.text
    assert originated == [] and await channels(ari_env) == before


async def test_the_guard_builds_the_endpoint_from_the_checked_number(
    calls_api: tuple[str, list[Any]], ari_env: AriEnv,
) -> None:
    url, originated = calls_api
    async with httpx.AsyncClient() as client:
        answer = await client.post(f"{url}/calls", headers=AUTH, json={
            "number": "(202) 555-0123", "variables": {"HOLD": "1", "PRESS": ""}})
        assert answer.status_code == 201, answer.text
        assert originated[0][0] == "Local/12025550123@optout-test-dial"
        assert originated[0][1]["OPTOUT_NUMBER"] == "+12025550123"
        await client.delete(f"{ari_env.url}/ari/channels/{answer.json()['channelId']}",
                            auth=(ari_env.username, ari_env.password))
