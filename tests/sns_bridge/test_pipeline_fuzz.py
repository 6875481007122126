"""The whole-pipeline fuzz test (issue 20): random SNS events (signed HTTP deliveries and SQS messages through
moto) and random FastAGI sessions, through the real bridge and agent (BridgeHttp, SqsPoller, AgiServer, one
pipeline, the Replayer and the SNS publisher running) into the real PostgreSQL and Redis. Afterwards: no 500 was
answered, every loop still runs, every valid number was stored, and nothing was listed that the input did not
name as the callee. Bounded: FUZZ_EXAMPLES examples of at most FUZZ_INPUTS inputs each (figures printed)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import uuid
from typing import Any

import httpx
from conftest import Wiring, open_endpoint
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from signing import SigningIdentity, ToLocalServer, notification, sign

from agent.agi import AgiServer
from agent.cache import RedisCache
from agent.dial_guard import DialGuard
from agent.intake import Intake
from agent.journal import Journal
from agent.lookup import BlacklistChecker
from agent.pipeline import OptOutPipeline, Replayer
from agent.publisher import SnsPublisher
from agent.store_postgres import PostgresStore
from sns_bridge.handler import BridgeHandler, MessageIdDedupe
from sns_bridge.sqs import SqsPoller

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
FUZZ_INPUTS = 40
CALLEES = st.integers(0, 9999).map(lambda n: f"+1202555{n:04d}")
INJECTED = st.integers(0, 9999).map(lambda n: f"+1303555{n:04d}")
"""Numbers only ever put where a parser must not find them: none of them may be listed."""
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                    max_leaves=5)
SHAPES = st.sampled_from(["{}", "{} ", "({a}) {b}-{c}", "{a}.{b}.{c}", "+1 {a} {b} {c}", "1-{a}-{b}-{c}"])


def shaped(number: str, shape: str) -> str:
    national = number[2:]
    return shape.format(number, a=national[:3], b=national[3:6], c=national[6:]) if "{a}" in shape else \
        shape.format(number)


def hostile_id(injected: str) -> st.SearchStrategy[Any]:
    return st.one_of(st.just(f"spring,OPTOUT_NUMBER={injected}"), st.just(f"x\nagi_arg_9: OPTOUT_NUMBER={injected}"),
                     st.just(f'a",OPTOUT_NUMBER={injected},"'), st.just("=HYPERLINK(1)"), st.text(max_size=10), JSON)


@st.composite
def sns_inputs(draw: Any) -> dict[str, Any]:
    callee, injected = draw(CALLEES), draw(INJECTED)
    valid = draw(st.booleans())
    event: dict[str, Any] = {"phoneNumber": shaped(callee, draw(SHAPES)) if valid else draw(
        st.one_of(JSON, st.just("12"), st.just(f"{callee}999")))}
    for name in ("callId", "campaignId", "contactId", "dtmfInput", "eventId", "origin", "timestamp"):
        if draw(st.booleans()):
            event[name] = draw(st.one_of(hostile_id(injected), st.just("0001-01-01T00:00:00+01:00"),
                                         st.just("9999-12-31T23:59:59-01:00")))
    return {"kind": "sns", "way": draw(st.sampled_from(["http", "http", "sqs"])), "event": event,
            "callee": callee if valid else None, "injected": injected,
            "envelope": draw(st.sampled_from([None, None, None, "Type", "TopicArn", "Signature", "Message"])),
            "envelope_value": draw(JSON)}


def b64(value: str) -> str:
    return base64.b64encode(("." + value).encode()).decode()


@st.composite
def agi_inputs(draw: Any) -> dict[str, Any]:
    callee, injected = draw(CALLEES), draw(INJECTED)
    valid = draw(st.booleans())
    number = callee if valid else draw(st.sampled_from(["12", "", "+1202"]))
    ids = {"CALL_ID": f"c-{uuid.uuid4().hex[:8]}", "CAMPAIGN_ID": draw(st.sampled_from(
        ["camp", f"spring,OPTOUT_NUMBER={injected}", f"x\nOPTOUT_NUMBER={injected}", '"(['])), "CONTACT_ID": "k"}
    mode = draw(st.sampled_from(["b64", "plain", "none", "split", "header", "b64+plain"]))
    args: list[str] = []
    extra: list[str] = []
    if mode == "b64":
        args = [f"OPTOUT_NUMBER:b64={b64(number)}", *(f"{k}:b64={b64(v)}" for k, v in ids.items())]
    elif mode == "plain":
        args = [f"OPTOUT_NUMBER={number}", "CALL_ID=" + ids["CALL_ID"], "CONTACT_ID=k"]
    elif mode == "split":  # what an unescaped dialplan sends for CAMPAIGN_ID="spring,OPTOUT_NUMBER=..."
        args = [f"OPTOUT_NUMBER={number}", "CAMPAIGN_ID=spring", f"OPTOUT_NUMBER={injected}"]
    elif mode == "header":  # a line break in a value: a header of the value's own choosing
        args = [f"OPTOUT_NUMBER={number}", "CAMPAIGN_ID=spring"]
        extra = [f"agi_arg_1: OPTOUT_NUMBER={injected}"]
    elif mode == "b64+plain":
        args = [f"OPTOUT_NUMBER:b64={b64(number)}", f"OPTOUT_NUMBER={injected}"]
    return {"kind": "agi", "number": number, "callee": callee if valid else None, "injected": injected,
            "args": args, "extra": extra, "channel": {"OPTOUT_NUMBER": number, **ids}}


async def fastagi_session(port: int, item: dict[str, Any]) -> list[str]:
    uniqueid = f"{uuid.uuid4().int % 10**9}.{uuid.uuid4().int % 1000}"
    lines = ["agi_network: yes", "agi_network_script: optout", "agi_channel: PJSIP/trunk-0000002a",
             f"agi_uniqueid: {uniqueid}", *(f"agi_arg_{i}: {a}" for i, a in enumerate(item["args"], 1)),
             *item["extra"]]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(("\n".join(lines) + "\n\n").encode())
    got = []
    try:
        while line := await asyncio.wait_for(reader.readline(), 10.0):
            cmd = line.decode().strip()
            got.append(cmd)
            if cmd.startswith("GET VARIABLE "):
                value = item["channel"].get(cmd.split()[-1])
                writer.write(f"200 result=1 ({value})\n".encode() if value else b"200 result=0\n")
            else:
                writer.write(b"200 result=1\n")
            await writer.drain()
    finally:
        writer.close()
    return got


# No shrinking: an example runs the whole pipeline for about a second, and a failure prints its inputs as they are.
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
          phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(inputs=st.lists(st.one_of(sns_inputs(), agi_inputs()), min_size=10, max_size=FUZZ_INPUTS))
async def test_random_events_and_sessions_through_the_whole_pipeline(
    inputs: list[dict[str, Any]], identity: SigningIdentity, transport: ToLocalServer, sqs: Any, sns: Any,
    wiring: Wiring, moto_url: str, pg_store: PostgresStore, cache: RedisCache, tmp_path: Any,
    unused_tcp_port_factory: Any,
) -> None:
    started = time.monotonic()
    async with Journal(tmp_path / f"fuzz-{uuid.uuid4().hex[:6]}.db", publish=True) as journal:
        pipeline = OptOutPipeline(journal=journal, store=pg_store, cache=cache)
        handler = BridgeHandler(pipeline=pipeline, region="US", dedupe=MessageIdDedupe(redis=cache.client))
        intake = Intake(pipeline=pipeline, digit="9", region="US")
        checker = BlacklistChecker(store=pg_store, cache=cache, journal=None, region="US")
        guard = DialGuard(checker=checker, store=pg_store)
        port = unused_tcp_port_factory()
        poller = SqsPoller(handler=handler, client=sqs, queue_url=wiring.queue_url, wait_seconds=1,
                           visibility_timeout=1)
        async with SnsPublisher(journal=journal, topic_arn=wiring.topic_arn, region="us-east-1",
                                endpoint_url=moto_url, poll_interval=0.2, connect_timeout=0.5, read_timeout=2.0,
                                max_attempts=1) as publisher, \
                AgiServer(host="127.0.0.1", port=port, intake=intake, guard=guard) as agi:
            loops = {name: asyncio.create_task(run(), name=name) for name, run in (
                ("replayer", Replayer(pipeline, interval=0.2).run), ("sqs-poller", poller.run),
                ("publisher", publisher.run))}
            every = {n for item in inputs for n in (item["callee"], item["injected"]) if n}
            before = await pg_store.blacklisted(sorted(every))  # listed by an earlier example (same store)
            async for endpoint in open_endpoint(handler, transport, journal):
                statuses, expected = await _feed(inputs, endpoint, identity, sns, wiring, port)
                break
            for _ in range(300):  # the SQS deliveries arrive within a few polls
                if await pg_store.blacklisted(sorted(expected)) == expected:
                    break
                await asyncio.sleep(0.1)
            await intake.drain(within=5.0)
            listed = await pg_store.blacklisted(sorted(every))
            alive = {name: not task.done() for name, task in loops.items()}
            for task in loops.values():
                task.cancel()
            await asyncio.gather(*loops.values(), return_exceptions=True)
            assert agi.listening
    assert 500 not in statuses, statuses
    assert set(statuses) <= {200, 400, 403}, statuses
    assert all(alive.values()), f"a loop stopped: {alive}"
    listed -= before - expected
    odd = expected ^ listed
    assert listed == expected, (f"missing {sorted(expected - listed)}; listed without being named as a callee "
                                f"{sorted(listed - expected)}; inputs naming them: "
                                f"{[i for i in inputs if i['callee'] in odd or i['injected'] in odd]}")
    print(f"fuzz: {len(inputs)} inputs ({sum(i['kind'] == 'sns' for i in inputs)} SNS events, "
          f"{sum(i['kind'] == 'agi' for i in inputs)} FastAGI sessions), {len(expected)} callees listed, "
          f"{time.monotonic() - started:.1f} s")


async def _feed(inputs: list[dict[str, Any]], endpoint: Any, identity: SigningIdentity, sns: Any, wiring: Wiring,
                port: int) -> tuple[list[int], set[str]]:
    """Deliver every input (concurrently); the HTTP statuses, and the callees the input validly named."""
    statuses: list[int] = []
    expected: set[str] = set()

    async def one(item: dict[str, Any]) -> None:
        if item["kind"] == "agi":
            got = await fastagi_session(port, item)
            assert got and got[-1] == "HANGUP", got
            if item["callee"]:
                expected.add(item["callee"])
            return
        event, callee = item["event"], item["callee"]
        skipped = isinstance(event.get("eventId"), str) and event.get("origin") in ("ari", "agi", "ami", "admin")
        message = json.dumps(event)
        if item["way"] == "sqs":
            await sns.publish(TopicArn=wiring.topic_arn, Message=message,
                              MessageAttributes={"origin": {"DataType": "String", "StringValue": "crm"}})
            if callee and not skipped:
                expected.add(callee)
            return
        envelope = sign(notification(Message=message, MessageId=str(uuid.uuid4()), MessageAttributes={}), identity)
        if item["envelope"]:
            envelope[item["envelope"]] = item["envelope_value"]
        try:
            response = await endpoint.post(envelope)
        except httpx.HTTPError as exc:
            raise AssertionError(f"no answer: {exc!r}") from exc
        statuses.append(response.status_code)
        if item["envelope"] is None and callee and not skipped:
            assert response.status_code == 200, response.text
            expected.add(callee)

    await asyncio.gather(*(one(item) for item in inputs))
    return statuses, expected

