"""Which number opts out: only one the call proves is the callee's (agent/telephony.py).

A dialer originates a call over ARI the way many do, with a caller ID and without OPTOUT_NUMBER, to a real
SIP user agent (SIPp, Debian's `sip-tester`) that answers and presses 9 as RFC 4733 RTP. Through each way
in (ARI, AMI, FastAGI) the number Asterisk dialled is listed, never the dialer's caller ID; on a call
whose number nothing proves, the press is audited as number_unknown and no number is listed.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.agi import AgiServer
from agent.ami import AmiAgent
from agent.ari import AriAgent
from agent.store import ActionRow
from agent.store_postgres import PostgresStore
from tests.asterisk.conftest import AriEnv, eventually
from tests.asterisk.test_agi import AsteriskCalls, random_number

pytestmark = pytest.mark.asterisk

HERE = Path(__file__).resolve().parent
DIALER_CALLER_ID = "+15559990000"
PCAP = Path("/usr/share/sip-tester/dtmf_2833_9.pcap")


def free_udp_port() -> int:
    for _ in range(50):
        port = random.randint(15000, 16999)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free UDP port")


class Callee:
    """SIPp as the called party: answers one call and presses 9 a second later."""

    def __init__(self, workdir: Path) -> None:
        if shutil.which("sipp") is None or not PCAP.exists():
            pytest.fail("SIPp (Debian package sip-tester) is missing: `make test` installs it")
        self.port = free_udp_port()
        self._media = free_udp_port()
        self._workdir = workdir
        scenario = (HERE / "fixtures" / "sipp-callee.xml").read_text().replace("[field0]", str(PCAP))
        self._scenario = workdir / "callee.xml"
        self._scenario.write_text(scenario)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["sipp", "-sf", str(self._scenario), "-i", "127.0.0.1", "-p", str(self.port), "-mi", "127.0.0.1",
             "-mp", str(self._media), "-m", "1", "-timeout", "40", "-nostdin"],
            cwd=self._workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        # Asterisk's INVITE must not arrive before SIPp listens (the call would fail, never pressing 9).
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and self.proc.poll() is None:
            if f":{self.port:04X} " in Path("/proc/net/udp").read_text():  # read only: never races SIPp's bind
                return
            time.sleep(0.02)
        pytest.fail(f"SIPp did not listen on UDP {self.port} (exit code {self.proc.poll()})")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)


@pytest.fixture
def callee(tmp_path: Path) -> Iterator[Callee]:
    c = Callee(tmp_path)
    c.start()
    yield c
    c.stop()


async def originate(ari_env: AriEnv, callee: Callee, number: str, **target: str) -> str:
    """Originate as a dialer does: a caller ID, the callee's number only in the dial string."""
    call_id = f"t-{uuid.uuid4().hex[:12]}"
    params = {"endpoint": f"PJSIP/callee/sip:{number}@127.0.0.1:{callee.port}", "callerId": DIALER_CALLER_ID,
              "timeout": "20", **target}
    auth = aiohttp.BasicAuth(ari_env.username, ari_env.password)
    async with aiohttp.ClientSession(auth=auth) as http, http.post(
            f"{ari_env.url}/ari/channels", params=params,
            json={"variables": {"CALL_ID": call_id, "CAMPAIGN_ID": "camp-dialled"}}) as resp:
        assert resp.status == 200, await resp.text()
    return call_id


async def stored_row(store: PostgresStore, number: str, within: float = 15.0) -> ActionRow:
    rows = await eventually(lambda: store.history(number), within=within)
    assert rows, f"{number} was not stored"
    [row] = rows
    return row


async def assert_dialled_number_listed(store: PostgresStore, number: str, origin: str) -> None:
    row = await stored_row(store, number)
    assert (row.origin, row.outcome) == (origin, "blacklisted")
    assert row.number_source.startswith("dialled")
    assert row.hangup_result == "ok"
    assert await store.blacklisted([DIALER_CALLER_ID]) == set(), "the dialer's own caller ID was blacklisted"


async def test_ari_lists_the_dialled_number_never_the_callers_id(
    ari_env: AriEnv, ari_agent: AriAgent, callee: Callee, pg_store: PostgresStore
) -> None:
    number = random_number()
    await originate(ari_env, callee, number, app=ari_env.app)
    await assert_dialled_number_listed(pg_store, number, "ari")


async def test_ami_lists_the_dialled_number_never_the_callers_id(
    ari_env: AriEnv, ami: AmiAgent, callee: Callee, pg_store: PostgresStore
) -> None:
    number = random_number()
    await originate(ari_env, callee, number, context="optout-plain-ivr", extension="s", priority="1")
    await assert_dialled_number_listed(pg_store, number, "ami")


async def test_agi_lists_the_dialled_number_never_the_callers_id(
    ari_env: AriEnv, agi: AgiServer, callee: Callee, pg_store: PostgresStore
) -> None:
    number = random_number()
    await originate(ari_env, callee, number, context="optout-agi-ivr", extension="s", priority="1")
    await assert_dialled_number_listed(pg_store, number, "agi")


async def number_unknown_on_an_inbound_call(ivr: str, calls: AsteriskCalls, pg_store: PostgresStore) -> None:
    """On an inbound leg remote_uri is the caller: nothing proves the callee, so nothing is listed."""
    campaign = f"camp-{uuid.uuid4().hex[:8]}"
    call = await calls.wait(await calls.place("", press="9", ivr=ivr, via="sip", campaign_id=campaign), within=10)
    assert call.hangup_requested_at is not None, "the call must end even when the number is unknown"

    async def rows() -> list[ActionRow]:
        return [r async for r in pg_store.actions(campaign_id=campaign)]

    [row] = await eventually(rows, within=10)
    assert row.outcome == "number_unknown" and row.phone_number is None
    assert await pg_store.blacklisted([DIALER_CALLER_ID]) == set()


async def test_ami_records_number_unknown_on_an_inbound_call_without_optout_number(
    ami: AmiAgent, calls: AsteriskCalls, pg_store: PostgresStore
) -> None:
    await number_unknown_on_an_inbound_call("plain", calls, pg_store)


async def test_agi_records_number_unknown_on_an_inbound_call_without_optout_number(
    agi: AgiServer, calls: AsteriskCalls, pg_store: PostgresStore
) -> None:
    await number_unknown_on_an_inbound_call("agi", calls, pg_store)


@pytest.fixture
async def ami(intake: Any) -> AsyncIterator[AmiAgent]:
    from tests.asterisk.test_ami import serving_ami

    async with serving_ami(intake) as agent:
        yield agent


@pytest.fixture
async def agi(intake: Any, pg_store: PostgresStore, cache: Any) -> AsyncIterator[AgiServer]:
    from tests.asterisk.test_agi import serving_agi

    async with serving_agi(intake, pg_store, cache) as server:
        yield server
