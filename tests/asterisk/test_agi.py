"""The FastAGI agent against the real Asterisk sandbox (AGI_PORT 4573, what the dialplan calls) and PostgreSQL.

Asterisk's side is checked through ARI: a CallObserver for IVR calls, a plain subscribeAll websocket for the
precheck's UserEvent and hangup cause. Bad-request tests talk FastAGI directly, like Asterisk would.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from panoramisk import Manager

from agent.agi import AgiServer
from agent.cache import RedisCache
from agent.dial_guard import DialGuard
from agent.intake import Intake
from agent.journal import Journal
from agent.lookup import BlacklistChecker
from agent.pipeline import OptOutPipeline
from agent.store import ActionRow
from agent.store_postgres import PostgresStore
from tests.conftest import make_record

pytestmark = pytest.mark.asterisk

AGI_HOST = os.environ.get("AGI_HOST", "127.0.0.1")
AGI_PORT = int(os.environ.get("AGI_PORT", "4573"))


def random_number() -> str:
    return f"+1202555{random.randint(0, 9999):04d}"


AMI_USER = os.environ.get("AMI_USERNAME", "optout")
AMI_SECRET = os.environ.get("AMI_SECRET", "")
IVR_CONTEXTS = {"optout-ivr", "optout-agi-ivr", "optout-plain-ivr"}


@dataclass
class Call:
    """A test call as Asterisk reports it over AMI (receive times: manager.conf has no timestampevents)."""

    call_id: str
    number: str
    ivr_uniqueid: str | None = None
    digits: list[str] = field(default_factory=list)
    pressed_at: float | None = None
    hangup_requested_at: float | None = None
    gone_at: float | None = None

    @property
    def press_to_hangup_ms(self) -> float | None:
        if self.pressed_at is None or self.hangup_requested_at is None:
            return None
        return (self.hangup_requested_at - self.pressed_at) * 1000


class AsteriskCalls:
    """Places test calls (ARI REST originate into the shipped test contexts) and follows them over AMI.

    The ARI websocket is not used: every observer in the suite shares one ARI app name, and Asterisk's app
    registry has been seen wedged when two processes held it at once.
    """

    def __init__(self, ari_env: Any) -> None:
        self._ari = ari_env
        self.calls: dict[str, Call] = {}
        self.causes: dict[str, int] = {}
        self._manager: Manager | None = None
        token = base64.b64encode(f"{ari_env.username}:{ari_env.password}".encode()).decode()
        self._http = aiohttp.ClientSession(headers={"Authorization": f"Basic {token}"})

    async def start(self) -> None:
        if not AMI_SECRET:
            pytest.fail("AMI_SECRET is not set: source .run/test.env")
        loop = asyncio.get_running_loop()
        self._manager = Manager(host="127.0.0.1", port=5038, username=AMI_USER, secret=AMI_SECRET,
                                ping_delay=3600, loop=loop)
        self._manager.register_event("*", self._on_event)
        await self._manager.connect()
        for _ in range(200):
            if self._manager.authenticated:
                return
            await asyncio.sleep(0.01)
        pytest.fail("AMI login failed")

    async def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
        await self._http.close()

    def _on_event(self, manager: Any, event: Any) -> None:
        now = time.time()
        channel = str(event.get("Channel") or "")
        if event.event == "Hangup" and "@optout-outbound-example-" in channel and channel.endswith(";2"):
            self.causes[channel.split("@")[0].removeprefix("Local/")] = int(event.get("Cause") or 0)
        variables = event.get("ChanVariable") or []
        if isinstance(variables, str):
            variables = [variables]
        call_id = next((v.split("=", 1)[1] for v in variables if v.startswith("CALL_ID=")), None)
        call = self.calls.get(call_id or "")
        if call is None:
            return
        uniqueid = event.get("Uniqueid")
        if event.event == "DTMFEnd" and event.get("Direction") == "Received" and event.get("Context") in IVR_CONTEXTS:
            call.ivr_uniqueid = call.ivr_uniqueid or uniqueid
            call.digits.append(event.get("Digit"))
            if event.get("Digit") == "9" and call.pressed_at is None:
                call.pressed_at = now
        elif uniqueid != call.ivr_uniqueid:
            return
        elif event.event in ("HangupRequest", "SoftHangupRequest") and call.hangup_requested_at is None:
            call.hangup_requested_at = now
        elif event.event == "Hangup":
            call.gone_at = now

    async def place(self, number: str, *, press: str, ivr: str, via: str = "local", hold: int = 10,
                    campaign_id: str = "test-campaign") -> Call:
        call_id = f"t-{uuid.uuid4().hex[:12]}"
        call = self.calls[call_id] = Call(call_id, number)
        if via == "sip":
            params = {"endpoint": f"Local/{ivr}@optout-test-sip-out", "context": "optout-test-caller"}
        else:
            params = {"endpoint": "Local/s@optout-test-caller", "context": IVR_BY_NAME[ivr]}
        params.update(extension="s", priority="1", timeout="30")
        variables = {"PRESS": press, "HOLD": str(hold), "CALL_ID": call_id, "CAMPAIGN_ID": campaign_id,
                     "CONTACT_ID": f"contact-{call_id}", "OPTOUT_NUMBER": number}
        async with self._http.post(f"{self._ari.url}/ari/channels", params=params,
                                   json={"variables": variables}) as resp:
            assert resp.status == 200, await resp.text()
        return call

    async def originate_precheck(self, number: str, *, hold: int = 1) -> None:
        """Local/<number>@optout-outbound-example: the precheck Gosub runs on the ;2 half."""
        params = {"endpoint": f"Local/{number}@optout-outbound-example", "context": "optout-test-caller",
                  "extension": "s", "priority": "1", "timeout": "10"}
        async with self._http.post(f"{self._ari.url}/ari/channels", params=params,
                                   json={"variables": {"HOLD": str(hold), "PRESS": ""}}) as resp:
            assert resp.status == 200, await resp.text()

    async def precheck_cause(self, number: str, *, within: float = 8.0) -> int | None:
        """The hangup cause of the precheck channel: 21 (rejected) when blocked, 16 when the call went on."""
        deadline = time.monotonic() + within
        while number not in self.causes and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        return self.causes.get(number)

    async def wait(self, call: Call, *, within: float, hung_up: bool = True) -> Call:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if call.gone_at is not None and (not hung_up or call.hangup_requested_at is not None):
                break
            await asyncio.sleep(0.02)
        return call


IVR_BY_NAME = {"ari": "optout-ivr", "agi": "optout-agi-ivr", "plain": "optout-plain-ivr"}


def us_guard(pg_store: PostgresStore, cache: RedisCache) -> DialGuard:
    return DialGuard(checker=BlacklistChecker(store=pg_store, cache=cache, journal=None, region="US"), store=pg_store)


@pytest.fixture
def guard(pg_store: PostgresStore, cache: RedisCache) -> DialGuard:
    return us_guard(pg_store, cache)


@contextlib.asynccontextmanager
async def serving_agi(intake: Intake, pg_store: PostgresStore, cache: RedisCache) -> AsyncIterator[AgiServer]:
    """The FastAGI server with a US dial guard; presses and prevented-call records drained on the way out."""
    guard = us_guard(pg_store, cache)
    try:
        async with AgiServer(host=AGI_HOST, port=AGI_PORT, intake=intake, guard=guard) as server:
            yield server
    finally:
        await intake.drain(within=5.0)
        await guard.drain(within=5.0)


@pytest.fixture
def us_intake(pipeline: OptOutPipeline) -> Intake:
    return Intake(pipeline=pipeline, digit="9", region="US")


@pytest.fixture
async def agi(us_intake: Intake, guard: DialGuard) -> AsyncIterator[AgiServer]:
    async with AgiServer(host=AGI_HOST, port=AGI_PORT, intake=us_intake, guard=guard, header_timeout=1.0) as server:
        yield server
    await us_intake.drain(within=5.0)
    await guard.drain(within=5.0)  # prevented-call records still being written, before the store closes


async def wait_rows(store: PostgresStore, number: str, *, count: int = 1, within: float = 5.0) -> list[ActionRow]:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        rows = await store.history(number)
        if len(rows) >= count or asyncio.get_running_loop().time() > deadline:
            return rows
        await asyncio.sleep(0.05)


# --- the optout script through Asterisk ---------------------------------------------------------------
@pytest.mark.parametrize("via", ["sip", "local"])
async def test_nine_in_agi_ivr_hangs_up_and_records_the_optout(
    via: str, agi: AgiServer, calls: AsteriskCalls, pg_store: PostgresStore
) -> None:
    number = random_number()
    call = await calls.wait(await calls.place(number, press="9", via=via, ivr="agi", campaign_id="camp-agi"),
                            within=8)
    assert call.pressed_at is not None, call
    assert call.hangup_requested_at is not None, "the agent did not hang the IVR channel up"
    assert call.press_to_hangup_ms is not None
    assert call.press_to_hangup_ms < 2000  # long before the caller's own hangup (10 s)
    [row] = await wait_rows(pg_store, number)
    assert row.origin == "agi"
    assert row.call_id == call.call_id
    assert row.campaign_id == "camp-agi"
    assert row.contact_id == f"contact-{call.call_id}"
    assert row.digit == "9"
    assert row.hangup_method == "agi"
    assert row.hangup_result == "ok"
    assert await pg_store.blacklisted([number]) == {number}


async def test_other_digit_in_agi_ivr_records_nothing(
    agi: AgiServer, calls: AsteriskCalls, pg_store: PostgresStore
) -> None:
    number = random_number()
    call = await calls.wait(await calls.place(number, press="5", ivr="agi", hold=1), within=6, hung_up=False)
    assert call.digits == ["5"]
    assert call.hangup_requested_at is None or call.hangup_requested_at >= call.gone_at - 0.5  # the caller left
    await asyncio.sleep(0.3)
    assert await pg_store.history(number) == []
    assert await pg_store.blacklisted([number]) == set()


# --- the precheck script through Asterisk --------------------------------------------------------------
async def test_precheck_blocks_a_blacklisted_number_with_cause_21_and_records_the_prevented_call(
    agi: AgiServer, calls: AsteriskCalls, pipeline: OptOutPipeline, pg_store: PostgresStore, guard: DialGuard
) -> None:
    number = random_number()
    await pipeline.submit(make_record(number))
    await calls.originate_precheck(number)
    assert await calls.precheck_cause(number) == 21
    await guard.drain(within=2.0)
    assert [r.outcome for r in await pg_store.history(number)] == ["blacklisted", "prevented"]


async def test_precheck_lets_a_clear_number_through(agi: AgiServer, calls: AsteriskCalls) -> None:
    number = random_number()
    await calls.originate_precheck(number, hold=1)
    assert await calls.precheck_cause(number) == 16


async def test_precheck_fails_closed_when_the_agent_is_down(calls: AsteriskCalls) -> None:
    with contextlib.suppress(OSError):  # nothing may listen on the AGI port for this test
        _, w = await asyncio.open_connection(AGI_HOST, AGI_PORT)
        w.close()
        pytest.skip(f"something else listens on {AGI_HOST}:{AGI_PORT}")
    number = random_number()
    await calls.originate_precheck(number, hold=1)
    assert await calls.precheck_cause(number) == 21


# --- bad requests, talking FastAGI directly --------------------------------------------------------------
def agi_headers(script: str | None, *args: str, uniqueid: str = "1700000000.1") -> bytes:
    lines = ["agi_network: yes", f"agi_request: agi://127.0.0.1/{script}", "agi_channel: PJSIP/test-00000001",
             f"agi_uniqueid: {uniqueid}", "agi_context: optout-agi-ivr", "agi_extension: s"]
    if script is not None:
        lines.append(f"agi_network_script: {script}")
    lines += [f"agi_arg_{i}: {a}" for i, a in enumerate(args, 1)]
    return ("\n".join(lines) + "\n\n").encode()


async def play_asterisk(
    request: bytes, variables: dict[str, str] | None = None, *, stop_after: int | None = None,
    slow: dict[str, float] | None = None,
) -> list[str]:
    """Act as Asterisk on one FastAGI connection: answer each command (`slow`: seconds to wait before
    answering GET VARIABLE of these names); the commands received, in order."""
    reader, writer = await asyncio.open_connection(AGI_HOST, AGI_PORT)
    writer.write(request)
    await writer.drain()
    got: list[str] = []
    try:
        while True:
            line = await asyncio.wait_for(reader.readline(), 3.0)
            if not line:
                break
            cmd = line.decode().strip()
            got.append(cmd)
            if stop_after is not None and len(got) >= stop_after:
                break
            if cmd.startswith("GET VARIABLE "):
                await asyncio.sleep((slow or {}).get(cmd.split()[-1], 0.0))
                value = (variables or {}).get(cmd.split()[-1])
                writer.write(f"200 result=1 ({value})\n".encode() if value else b"200 result=0\n")
            else:
                writer.write(b"200 result=1\n")
            await writer.drain()
    finally:
        writer.close()
    return got


async def assert_still_serving(number: str, expected: str) -> None:
    assert await play_asterisk(agi_headers("precheck", number)) == [f"SET VARIABLE OPTOUT_BLOCKED {expected}"]


async def test_bad_requests_are_refused_and_the_server_keeps_serving(agi: AgiServer, pipeline: OptOutPipeline) -> None:
    number = random_number()
    await pipeline.submit(make_record(number))
    # unknown script: closed without a command
    assert await play_asterisk(agi_headers("no-such-script")) == []
    # no agi_network_script header
    assert await play_asterisk(agi_headers(None)) == []
    # garbage bytes, and bytes that are not UTF-8
    assert await play_asterisk(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == []
    assert await play_asterisk(b"\xff\xfe\x00garbage\n\n") == []
    # a line far beyond the header limit
    assert await play_asterisk(b"agi_network: " + b"x" * 100_000 + b"\n\n") == []
    # a client that closes before the end of the headers, and one that never finishes them (header timeout)
    _, w = await asyncio.open_connection(AGI_HOST, AGI_PORT)
    w.write(b"agi_network: yes\nagi_netw")
    await w.drain()
    w.close()
    r, w = await asyncio.open_connection(AGI_HOST, AGI_PORT)
    w.write(b"agi_network: yes\n")
    assert await asyncio.wait_for(r.read(), 3.0) == b""  # the server gives up after header_timeout (1 s)
    w.close()
    # a client that disconnects mid-command
    assert await play_asterisk(agi_headers("precheck"), stop_after=1) == ["GET VARIABLE OPTOUT_NUMBER"]
    await assert_still_serving(number, "1")
    await assert_still_serving(random_number(), "0")


async def test_precheck_of_an_invalid_number_answers_blocked(agi: AgiServer) -> None:
    assert await play_asterisk(agi_headers("precheck", "12")) == ["SET VARIABLE OPTOUT_BLOCKED 1"]
    got = await play_asterisk(agi_headers("precheck"))
    assert got == ["GET VARIABLE OPTOUT_NUMBER", "SET VARIABLE OPTOUT_BLOCKED 1"]


async def test_precheck_reads_the_number_from_the_channel_when_no_argument(agi: AgiServer) -> None:
    got = await play_asterisk(agi_headers("precheck"), {"OPTOUT_NUMBER": random_number()})
    assert got == ["GET VARIABLE OPTOUT_NUMBER", "SET VARIABLE OPTOUT_BLOCKED 0"]


async def test_optout_hangs_up_even_when_the_journal_fails(
    pg_store: PostgresStore, cache: RedisCache, journal: Journal, guard: DialGuard
) -> None:
    await journal.close()  # every append now fails: the call must still end, the opt-out go straight to the store
    pipeline = OptOutPipeline(journal=journal, store=pg_store, cache=cache)
    intake = Intake(pipeline=pipeline, digit="9", region="US")
    number = random_number()
    async with AgiServer(host=AGI_HOST, port=AGI_PORT, intake=intake, guard=guard):
        got = await play_asterisk(agi_headers("optout", uniqueid=f"{uuid.uuid4().int % 10**9}.1"),
                                  {"OPTOUT_NUMBER": number, "CALL_ID": "c-1"})
        await intake.drain(within=5.0)
    assert got[-1] == "HANGUP"
    assert await pg_store.blacklisted([number]) == {number}


async def test_optout_without_uniqueid_still_hangs_up_and_records_what_it_knows(
    agi: AgiServer, pg_store: PostgresStore
) -> None:
    number = random_number()
    request = agi_headers("optout", f"OPTOUT_NUMBER={number}", uniqueid="").replace(b"agi_uniqueid: \n", b"")
    assert (await play_asterisk(request))[-1] == "HANGUP"
    [row] = await wait_rows(pg_store, number)
    assert row.origin == "agi"


async def test_optout_takes_ids_from_agi_arguments(agi: AgiServer, pg_store: PostgresStore) -> None:
    number = random_number()
    got = await play_asterisk(
        agi_headers("optout", f"OPTOUT_NUMBER={number}", "CALL_ID=arg-call", "CAMPAIGN_ID=arg-camp",
                    uniqueid=f"{uuid.uuid4().int % 10**9}.7"),
        {"CONTACT_ID": "var-contact"},
    )
    assert got == ["GET VARIABLE CONTACT_ID", "HANGUP"]
    [row] = await wait_rows(pg_store, number)
    assert (row.call_id, row.campaign_id, row.contact_id, row.origin) == (
        "arg-call", "arg-camp", "var-contact", "agi")


# --- presses that must never be lost (recorded transcripts where Asterisk cannot produce the case) ----------
async def test_a_latin1_caller_name_in_the_headers_is_read_not_refused(agi: AgiServer, pg_store: PostgresStore) -> None:
    number = random_number()
    request = agi_headers("optout", f"OPTOUT_NUMBER={number}", uniqueid=f"{uuid.uuid4().int % 10**9}.2")
    request = request.replace(b"agi_context:", b"agi_calleridname: Jos\xe9\nagi_context:")
    assert (await play_asterisk(request))[-1] == "HANGUP"
    [row] = await wait_rows(pg_store, number)
    assert row.origin == "agi"


async def test_a_failed_get_variable_still_records_what_is_known(agi: AgiServer, pg_store: PostgresStore) -> None:
    """Asterisk answers 511 on a dead channel, 510 to a command it does not know: the press is still stored."""
    number = random_number()
    reader, writer = await asyncio.open_connection(AGI_HOST, AGI_PORT)
    writer.write(agi_headers("optout", f"OPTOUT_NUMBER={number}", uniqueid=f"{uuid.uuid4().int % 10**9}.3"))
    got = []
    while line := await asyncio.wait_for(reader.readline(), 3.0):
        cmd = line.decode().strip()
        got.append(cmd)
        reply = b"511 Command Not Permitted on a dead channel or intercept routine\n" if cmd.startswith("GET") \
            else b"200 result=1\n"
        writer.write(reply)
        await writer.drain()
    writer.close()
    assert got[-1] == "HANGUP" and any(c.startswith("GET VARIABLE") for c in got)
    [row] = await wait_rows(pg_store, number)
    assert row.call_id is not None and row.outcome == "blacklisted"


async def test_the_callers_hangup_notice_right_after_the_press_is_not_an_error(
    agi: AgiServer, pg_store: PostgresStore
) -> None:
    """FastAGI sends "HANGUP" on its own when the caller hangs up; the reply to our command follows it."""
    number = random_number()
    reader, writer = await asyncio.open_connection(AGI_HOST, AGI_PORT)
    writer.write(agi_headers("optout", uniqueid=f"{uuid.uuid4().int % 10**9}.4"))
    writer.write(b"HANGUP\n")  # the caller hung up right after pressing
    got = []
    while line := await asyncio.wait_for(reader.readline(), 3.0):
        cmd = line.decode().strip()
        got.append(cmd)
        if cmd == "GET VARIABLE OPTOUT_NUMBER":
            writer.write(f"200 result=1 ({number})\n".encode())
        elif cmd.startswith("GET"):
            writer.write(b"511 Command Not Permitted on a dead channel or intercept routine\n")
        else:
            writer.write(b"511 Command Not Permitted on a dead channel or intercept routine\n")
        await writer.drain()
    writer.close()
    assert got[-1] == "HANGUP"
    [row] = await wait_rows(pg_store, number)
    assert row.hangup_result == "gone"


async def test_the_caller_hanging_up_at_once_through_asterisk_loses_no_press(
    agi: AgiServer, calls: AsteriskCalls, pg_store: PostgresStore
) -> None:
    number = random_number()
    await calls.place(number, press="9", ivr="agi", hold=0)  # the caller leaves right after the 9
    [row] = await wait_rows(pg_store, number, within=8)
    assert row.origin == "agi" and row.outcome == "blacklisted"


async def test_slow_peers_holding_every_slot_do_not_shut_out_a_real_call(
    pg_store: PostgresStore, us_intake: Intake, guard: DialGuard
) -> None:
    async with AgiServer(host=AGI_HOST, port=AGI_PORT, intake=us_intake, guard=guard, header_timeout=30.0,
                         max_waiting=8):
        slow = [await asyncio.open_connection(AGI_HOST, AGI_PORT) for _ in range(20)]
        for _, w in slow:
            w.write(b"agi_network: yes\n")  # and never the rest
            await w.drain()
        await asyncio.sleep(0.2)
        number = random_number()
        got = await play_asterisk(agi_headers("optout", f"OPTOUT_NUMBER={number}",
                                              uniqueid=f"{uuid.uuid4().int % 10**9}.5"))
        assert got[-1] == "HANGUP"
        [row] = await wait_rows(pg_store, number)
        assert row.origin == "agi"
        for _, w in slow:
            w.close()
        await us_intake.drain(within=5.0)


async def test_a_late_reply_is_never_read_as_the_next_variable(
    us_intake: Intake, guard: DialGuard, pg_store: PostgresStore,
) -> None:
    """CONTACT_ID answers after the command timeout: its value must not become the number to opt out."""
    number, contact = random_number(), random_number()
    async with AgiServer(host=AGI_HOST, port=AGI_PORT, intake=us_intake, guard=guard, command_timeout=0.3):
        got = await play_asterisk(agi_headers("optout", uniqueid=f"{uuid.uuid4().int % 10**9}.1"),
                                  {"CONTACT_ID": contact, "OPTOUT_NUMBER": number}, slow={"CONTACT_ID": 0.45})
        await us_intake.drain(within=5.0)
    assert got[-1] == "HANGUP"
    assert await pg_store.blacklisted([number, contact]) == {number}


async def test_a_shutdown_waits_for_a_press_still_reading_its_channel(
    us_intake: Intake, guard: DialGuard, pg_store: PostgresStore,
) -> None:
    number = random_number()
    server = AgiServer(host=AGI_HOST, port=AGI_PORT, intake=us_intake, guard=guard)
    async with server:
        asterisk = asyncio.create_task(play_asterisk(
            agi_headers("optout", uniqueid=f"{uuid.uuid4().int % 10**9}.1"), {"OPTOUT_NUMBER": number},
            slow={name: 0.3 for name in ("CALL_ID", "CAMPAIGN_ID", "CONTACT_ID", "OPTOUT_NUMBER")}))
        await asyncio.sleep(0.2)  # connected, reading its variables: SIGTERM now
        await us_intake.drain(within=5.0)  # what the agent does before it closes the ways in
        await server.stop_accepting()
        await us_intake.drain(within=2.0)
    got = await asterisk
    assert got[-1] == "HANGUP", f"the press was cut off by the shutdown: {got}"
    await us_intake.drain(within=5.0)
    assert await pg_store.blacklisted([number]) == {number}
