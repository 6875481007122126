"""Issue 20: hostile input at every boundary, against the real PostgreSQL and Redis. No record stops a loop,
no identifier is re-parsed into another field, no label or log keeps what the outside sent."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import metrics
from agent.cache import RedisCache
from agent.constants import Origin
from agent.errors import InvalidInput
from agent.journal import Journal
from agent.optout import (
    ID_FORBIDDEN,
    HangupInfo,
    OptOutRecord,
    clean_id,
    id_problem,
    parse_event,
    record_from_event,
    text_problem,
)
from agent.pipeline import OptOutPipeline, Replayer
from agent.store import StoreResult
from agent.store_postgres import PostgresStore
from tests.conftest import make_record

BAD_TIMES = ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00Z",
             "9999-12-31T23:59:59.999999+00:00", "1969-12-31T23:59:59Z", 10**20, -1e15, "+99999-01-01T00:00:00Z"]


# --- 1. one record never stops the replayer ------------------------------------------------------------------
@pytest.mark.parametrize("value", BAD_TIMES)
def test_a_timestamp_that_cannot_be_represented_is_dropped_by_name(value: object) -> None:
    parsed = parse_event({"phoneNumber": "+12025550123", "timestamp": value})
    assert parsed.event.timestamp is None
    [dropped] = parsed.dropped
    assert dropped.field == "timestamp"
    record = record_from_event(parsed.event, origin=Origin.SNS, region="US")
    assert record.event_json()["timestamp"]  # every later step can write it


class FailingStore(PostgresStore):
    """The real store, failing with a chosen exception type for the records whose number is in `poison`:
    as a driver does for a value it cannot convert (OverflowError, TypeError, ValueError...)."""

    def __init__(self, dsn: str, poison: dict[str, BaseException]) -> None:
        super().__init__(dsn)
        self.poison = poison

    async def write(self, records: Sequence[OptOutRecord]) -> Sequence[StoreResult]:
        for record in records:
            if record.phone_number in self.poison:
                raise self.poison[record.phone_number]
        return await super().write(records)


@pytest.mark.parametrize("error", [OverflowError("date value out of range"), TypeError("unhashable type: 'list'"),
                                   ValueError("year 0 is out of range"), KeyError("x"), RuntimeError("a bug")])
async def test_a_record_failing_with_any_exception_is_parked_and_the_others_are_stored(
    pg_dsn: str, journal: Journal, cache: RedisCache, error: BaseException,
) -> None:
    bad_number = "+12025559999"
    async with FailingStore(pg_dsn, {bad_number: error}) as store:
        await store.migrate()
        pipeline = OptOutPipeline(journal=journal, store=store, cache=cache)
        neighbours = [make_record(f"+1202555{i:04d}") for i in range(12)]
        for record in [*neighbours[:6], make_record(bad_number), *neighbours[6:]]:
            await journal.append(record)  # journaled during an outage: the replayer's to store
        for _ in range(4):
            await Replayer(pipeline, batch=5).drain()
        numbers = {r.phone_number for r in neighbours}
        assert await store.blacklisted([n or "" for n in numbers]) == numbers
        [parked] = await journal.parked()
        assert parked.phone_number == bad_number and type(error).__name__ in (parked.last_error or "")
        assert await Replayer(pipeline).drain() == 0, "a parked record is not retried by every pass"


async def test_a_journaled_record_with_an_unrepresentable_time_is_stored_with_its_neighbours(
    pipeline: OptOutPipeline, journal: Journal, pg_store: PostgresStore,
) -> None:
    """Journaled by a version that still accepted the time (or by a producer's record): the replayer must
    not fail its whole batch on every pass."""
    minus_one = timezone(timedelta(hours=-1))
    plus_one = timezone(timedelta(hours=1))
    odd = [make_record("+12025550001").model_copy(update={"pressed_at": datetime(1, 1, 1, tzinfo=plus_one)}),
           make_record("+12025550002").model_copy(
               update={"pressed_at": datetime(9999, 12, 31, 23, 59, tzinfo=minus_one)})]
    neighbours = [make_record(f"+1202555{i:04d}") for i in range(10, 20)]
    for record in [*odd, *neighbours]:
        await journal.append(record)
    await Replayer(pipeline).drain()
    numbers = {r.phone_number or "" for r in [*odd, *neighbours]}
    assert await pg_store.blacklisted(list(numbers)) == numbers
    assert await journal.depth() == 0


async def test_the_replayer_loop_outlives_a_pass_that_raises(
    pg_dsn: str, journal: Journal, cache: RedisCache,
) -> None:
    """Whatever a pass meets, `run` backs off and goes on (it never ends until cancelled)."""
    async with FailingStore(pg_dsn, {}) as store:
        await store.migrate()
        pipeline = OptOutPipeline(journal=journal, store=store, cache=cache)
        replayer = Replayer(pipeline, interval=0.05)
        calls = 0
        real_drain = replayer.drain

        async def drain() -> int:
            nonlocal calls
            calls += 1
            if calls <= 2:
                raise TypeError("'NoneType' object is not subscriptable")
            return await real_drain()

        replayer.drain = drain  # type: ignore[method-assign]
        await journal.append(record := make_record("+12025550077"))
        task = asyncio.create_task(replayer.run())
        for _ in range(400):
            if await store.blacklisted([record.phone_number or ""]):
                break
            replayer.wake()
            await asyncio.sleep(0.02)
        assert not task.done(), "the replayer loop must still run"
        task.cancel()
        assert await store.blacklisted([record.phone_number or ""]) == {record.phone_number}


# --- 2. one rule for identifiers ----------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["spring,OPTOUT_NUMBER=+12025559999", "a\r\nOPTOUT_NUMBER=+1", "x\n", "tab\there",
                                   'q"uote', "back\\slash", "pa(ren", "pa)ren", "br[ack", "br]ack", "br{ace}",
                                   "car^et", "pi|pe", "nul\x00", "bidi\u202e", "zw\u200bsp", "ls\u2028", "x" * 129, ""])
def test_the_identifier_rule_refuses_what_a_parser_would_split(value: str) -> None:
    assert id_problem(value) is not None
    cleaned = clean_id(value)
    assert cleaned is None or id_problem(cleaned) is None


@pytest.mark.parametrize("value", ["call-123", "campaign 456", "Spring 2025 / promo #3", "contact@example.com",
                                   "קמפיין-אביב", "urn:uuid:1b4e28ba-2fa1-11d2-883f-0016d3cca427", "x" * 128])
def test_the_identifier_rule_accepts_ordinary_ids(value: str) -> None:
    assert id_problem(value) is None
    assert clean_id(value) == value


@settings(max_examples=400)
@given(st.text(max_size=160))
def test_any_text_is_a_valid_identifier_or_cleaned_into_one(value: str) -> None:
    cleaned = clean_id(value)
    assert cleaned is None or id_problem(cleaned) is None
    if id_problem(value.strip()) is None and value.strip():
        assert cleaned == value.strip()
    assert not (set(cleaned or "") & set(ID_FORBIDDEN + "\r\n\t\x00"))


@pytest.mark.parametrize("field", ["callId", "campaignId", "contactId", "eventId", "dtmfInput"])
@pytest.mark.parametrize("value", ["spring,OPTOUT_NUMBER=+12025559999", "line\r\nbreak", "nul\x00", 'a"b'])
def test_an_event_id_field_that_breaks_the_rule_is_dropped_by_name(field: str, value: str) -> None:
    parsed = parse_event({"phoneNumber": "+12025550123", field: value})
    assert [d.field for d in parsed.dropped] == [field]
    assert "+12025559999" not in parsed.event.model_dump_json()


def test_free_text_refuses_line_breaks_and_controls() -> None:
    for value in ("a\nb", "a\rb", "a\tb", "a\x1bb", "a\u2029b", "a\x00b"):
        assert text_problem(value, 100) is not None
    assert text_problem("left, angry; asked twice (no more)", 100) is None


# --- 4. far-end text never becomes a label, and is cleaned before it is stored -------------------------------
def test_every_hangup_result_label_comes_from_the_fixed_set() -> None:
    samples = ["ok", "gone", "timeout", "not-found", None, "", "error: HANGUP failed: 510 \x00Invalid\r\n",
               "http 502", "error: " + "x" * 10_000, "\U0001f600", "OK", "unknown"]
    assert {metrics.hangup_label(s) for s in samples} <= metrics.HANGUP_RESULTS


def test_a_label_value_outside_its_set_is_counted_as_other() -> None:
    before = metrics.HANGUPS.metric.labels("agi", "other")._value.get()
    metrics.HANGUPS.labels("agi", "the far end's own words")
    metrics.HANGUPS.labels("no-such-origin", "ok").inc()
    metrics.HANGUPS.labels("agi", "the far end's own words").inc()
    assert metrics.HANGUPS.metric.labels("agi", "other")._value.get() == before + 1
    series = {tuple(s.labels.values()) for m in metrics.HANGUPS.metric.collect() for s in m.samples}
    assert all(o in metrics.ORIGINS | {"other"} and r in metrics.HANGUP_RESULTS | {"other"} for o, r, *_ in series)


def test_far_end_hangup_text_is_cleaned_and_cut_before_it_is_stored() -> None:
    info = HangupInfo(method="agi", result="error: HANGUP failed: 510 \x00" + "y" * 5000 + "\r\n")
    assert info.result is not None and "\x00" not in info.result and "\n" not in info.result
    assert len(info.result) <= 200


async def test_a_hangup_reply_with_a_nul_is_stored_not_parked(
    pipeline: OptOutPipeline, pg_store: PostgresStore,
) -> None:
    from agent.pipeline import Status

    record = make_record("+12025550188")

    async def hang_up() -> HangupInfo:
        return HangupInfo(method="agi", result="error: HANGUP failed: 520 \x00\x01 far end text")

    result = await pipeline.submit(record, hang_up=hang_up)
    assert result.status is Status.STORED
    [row] = await pg_store.history("+12025550188")
    assert row.hangup_result.startswith("error:") and "\x00" not in row.hangup_result
    assert row.campaign_id == "camp-1", "no field was stripped for it"


# --- 3. any JSON value in any field of an event -------------------------------------------------------------
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
EVENT_FIELDS = ("callId", "campaignId", "contactId", "phoneNumber", "dtmfInput", "timestamp", "eventId", "origin")


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional={f: JSON for f in EVENT_FIELDS}))
def test_any_json_value_in_any_event_field_parses_or_names_its_field(event: dict[str, Any]) -> None:
    event.setdefault("phoneNumber", "+12025550123")
    try:
        parsed = parse_event(event)
        record = record_from_event(parsed.event, origin=Origin.SNS, region="US")
    except InvalidInput as exc:
        assert exc.field in EVENT_FIELDS or exc.field == "event"
        return
    assert {d.field for d in parsed.dropped} <= set(EVENT_FIELDS)
    record.event_json()
    OptOutRecord.from_json(record.to_json())
    assert record.pressed_at is None or record.pressed_at.astimezone(UTC).year >= 1970


# --- 2 and 8. FastAGI: arguments that cannot be re-shaped, and capacity --------------------------------------------
def b64(value: str) -> str:
    import base64

    return base64.b64encode(("." + value).encode()).decode()


def agi_request(script: str, *args: str, uniqueid: str | None = None, extra: Sequence[str] = ()) -> bytes:
    import uuid

    lines = ["agi_network: yes", f"agi_network_script: {script}", "agi_channel: PJSIP/trunk-0000002a",
             f"agi_uniqueid: {uniqueid or f'{uuid.uuid4().int % 10**9}.9'}", "agi_context: optout-agi-ivr",
             "agi_extension: s", *(f"agi_arg_{i}: {a}" for i, a in enumerate(args, 1)), *extra]
    return ("\n".join(lines) + "\n\n").encode()


async def play_asterisk(port: int, request: bytes, variables: dict[str, str] | None = None) -> list[str]:
    """Act as Asterisk on one FastAGI connection; the commands received, in order."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    got: list[str] = []
    try:
        while line := await asyncio.wait_for(reader.readline(), 5.0):
            cmd = line.decode().strip()
            got.append(cmd)
            if cmd.startswith("GET VARIABLE "):
                value = (variables or {}).get(cmd.split()[-1])
                writer.write(f"200 result=1 ({value})\n".encode() if value else b"200 result=0\n")
            else:
                writer.write(b"200 result=1\n")
            await writer.drain()
    finally:
        writer.close()
    return got


@pytest.fixture
async def agi_port(pipeline: OptOutPipeline, pg_store: PostgresStore, cache: RedisCache,
                   unused_tcp_port: int) -> Any:
    from agent.agi import AgiServer
    from agent.dial_guard import DialGuard
    from agent.intake import Intake
    from agent.lookup import BlacklistChecker

    intake = Intake(pipeline=pipeline, digit="9", region="US")
    guard = DialGuard(checker=BlacklistChecker(store=pg_store, cache=cache, journal=None, region="US"), store=pg_store)
    async with AgiServer(host="127.0.0.1", port=unused_tcp_port, intake=intake, guard=guard, header_timeout=2.0):
        yield unused_tcp_port
        await intake.drain(within=5.0)
        await guard.drain(within=5.0)


async def wait_listed(store: PostgresStore, numbers: list[str]) -> set[str]:
    for _ in range(100):
        if found := await store.blacklisted(numbers):
            return found
        await asyncio.sleep(0.05)
    return set()


INJECTED = "+12025559999"
CALLEE = "+12025550111"


@pytest.mark.parametrize("args", [
    # what Asterisk sends for CAMPAIGN_ID="spring,OPTOUT_NUMBER=+1..." through an unescaped dialplan
    (f"OPTOUT_NUMBER={CALLEE}", "CALL_ID=c-1", "CAMPAIGN_ID=spring", f"OPTOUT_NUMBER={INJECTED}", "CONTACT_ID=k"),
    (f"OPTOUT_NUMBER={CALLEE}", f"OPTOUT_NUMBER:b64={b64(INJECTED)}"),
    (f"OPTOUT_NUMBER:b64={b64(CALLEE)}", f"OPTOUT_NUMBER={INJECTED}"),
    (f"CALL_ID=a,OPTOUT_NUMBER={INJECTED}", f"OPTOUT_NUMBER={INJECTED}", "CALL_ID=b"),
])
async def test_a_name_given_twice_is_refused_and_read_from_the_channel(
    agi_port: int, pg_store: PostgresStore, args: tuple[str, ...],
) -> None:
    got = await play_asterisk(agi_port, agi_request("optout", *args), {"OPTOUT_NUMBER": CALLEE, "CALL_ID": "c-1"})
    assert got[-1] == "HANGUP"
    assert "GET VARIABLE OPTOUT_NUMBER" in got, "none of the arguments is trusted"
    assert await wait_listed(pg_store, [CALLEE, INJECTED]) == {CALLEE}


async def test_an_argument_header_sent_twice_is_refused(agi_port: int, pg_store: PostgresStore) -> None:
    """A line break in a value makes Asterisk send a header of the value's own choosing."""
    request = agi_request("optout", f"OPTOUT_NUMBER={CALLEE}", "CAMPAIGN_ID=spring",
                          extra=[f"agi_arg_1: OPTOUT_NUMBER={INJECTED}"])
    got = await play_asterisk(agi_port, request, {"OPTOUT_NUMBER": CALLEE})
    assert "GET VARIABLE OPTOUT_NUMBER" in got and got[-1] == "HANGUP"
    assert await wait_listed(pg_store, [CALLEE, INJECTED]) == {CALLEE}


async def test_base64_arguments_carry_any_value_unchanged(agi_port: int, pg_store: PostgresStore) -> None:
    campaign = 'spring,OPTOUT_NUMBER=+12025559999"\\(['
    got = await play_asterisk(agi_port, agi_request(
        "optout", f"OPTOUT_NUMBER:b64={b64(CALLEE)}", f"CALL_ID:b64={b64('c-9')}",
        f"CAMPAIGN_ID:b64={b64(campaign)}", f"CONTACT_ID:b64={b64('')}"), {"CONTACT_ID": "from-channel"})
    assert got == ["HANGUP"], "every value came as an argument (an empty one is an empty variable)"
    assert await wait_listed(pg_store, [CALLEE]) == {CALLEE}
    [row] = await pg_store.history(CALLEE)
    assert row.call_id == "c-9" and row.campaign_id == "springOPTOUT_NUMBER=+12025559999", row
    assert await pg_store.blacklisted([INJECTED]) == set()


async def test_an_argument_that_is_not_base64_is_read_from_the_channel(agi_port: int, pg_store: PostgresStore) -> None:
    got = await play_asterisk(agi_port, agi_request("optout", "OPTOUT_NUMBER:b64=not*base64", "CALL_ID=c"),
                              {"OPTOUT_NUMBER": CALLEE})
    assert "GET VARIABLE OPTOUT_NUMBER" in got and got[-1] == "HANGUP"
    assert await wait_listed(pg_store, [CALLEE]) == {CALLEE}


async def test_precheck_reads_base64_arguments_and_refuses_a_repeated_one(
    agi_port: int, pipeline: OptOutPipeline, pg_store: PostgresStore,
) -> None:
    await pipeline.submit(make_record(INJECTED))
    clear = await play_asterisk(agi_port, agi_request("precheck", CALLEE[1:], f"NUMBER:b64={b64(CALLEE)}",
                                                      f"CALL_ID:b64={b64('p,1')}"))
    assert clear == ["SET VARIABLE OPTOUT_BLOCKED 0"]
    blocked = await play_asterisk(agi_port, agi_request("precheck", "+1", f"NUMBER:b64={b64(INJECTED)}",
                                                        f"CALL_ID:b64={b64('p,2')}"))
    assert blocked == ["SET VARIABLE OPTOUT_BLOCKED 1"]
    twice = await play_asterisk(agi_port, agi_request("precheck", CALLEE, f"NUMBER:b64={b64(CALLEE)}",
                                                      f"NUMBER={CALLEE}"))
    assert twice == ["SET VARIABLE OPTOUT_BLOCKED 1"], "which number is dialled is not known: blocked"
    for _ in range(100):
        rows = [r for r in await pg_store.history(INJECTED) if r.outcome == "prevented"]
        if rows:
            break
        await asyncio.sleep(0.05)
    assert rows[0].call_id == "p2", "the id is cleaned by the identifier rule"


def test_the_connection_limit_comes_from_the_open_file_limit() -> None:
    import subprocess
    import sys

    code = ("import resource; soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard)); "
            "from agent.agi import FD_HEADROOM, default_max_connections; "
            "print(default_max_connections(), min(1024, hard) - FD_HEADROOM)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == out[1] and int(out[0]) < 1024


async def test_a_session_whose_headers_arrived_is_never_evicted(
    pipeline: OptOutPipeline, pg_store: PostgresStore, cache: RedisCache,
) -> None:
    """The race of the issue: the headers of the oldest waiting session are in its buffer, but its task has not
    run since; a newcomer makes room first. The newcomer's eviction must pick a slow peer, not the press."""
    import socket

    from agent.agi import AgiServer, GuardedApplication
    from agent.dial_guard import DialGuard
    from agent.intake import Intake
    from agent.lookup import BlacklistChecker

    intake = Intake(pipeline=pipeline, digit="9", region="US")
    guard = DialGuard(checker=BlacklistChecker(store=pg_store, cache=cache, journal=None, region="US"), store=pg_store)
    server = AgiServer(host="127.0.0.1", port=0, intake=intake, guard=guard)
    app = GuardedApplication(header_timeout=30.0, max_connections=100, max_waiting=4)
    app.add_route("optout", server._optout)
    peers: list[socket.socket] = []
    tasks = []
    for _ in range(4):  # max_waiting: the next connection makes room
        ours, theirs = socket.socketpair()
        peers.append(theirs)
        reader, writer = await asyncio.open_connection(sock=ours)
        tasks.append(asyncio.create_task(app.handler(reader, writer)))
        await asyncio.sleep(0.01)
    for slow in peers[1:]:
        slow.sendall(b"agi_network: yes\n")
    ours, theirs = socket.socketpair()
    peers.append(theirs)
    reader, writer = await asyncio.open_connection(sock=ours)
    await asyncio.sleep(0.05)
    # The oldest session's headers reach the machine; the newcomer's first step runs before the loop hands them
    # to the session's task (in the very next round), and makes room.
    peers[0].sendall(agi_request("optout", f"OPTOUT_NUMBER={CALLEE}", "CALL_ID=c", "CAMPAIGN_ID=k",
                                 "CONTACT_ID=x"))
    tasks.append(asyncio.create_task(app.handler(reader, writer)))
    theirs.sendall(b"agi_network: yes\n")
    peers[0].setblocking(False)
    asterisk_reader, asterisk_writer = await asyncio.open_connection(sock=peers[0])
    line = await asyncio.wait_for(asterisk_reader.readline(), 5.0)
    assert line == b"HANGUP\n", "the press whose headers had arrived was cut off"
    asterisk_writer.write(b"200 result=1\n")
    await intake.drain(within=5.0)
    assert await pg_store.blacklisted([CALLEE]) == {CALLEE}
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    asterisk_writer.close()
    for peer in peers[1:]:
        peer.close()


# --- 5. CSV cells a spreadsheet cannot run ------------------------------------------------------------------------
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def formulas(data: bytes) -> list[str]:
    """The cells a spreadsheet would evaluate when it opens `data` as CSV: those whose first character is one
    that starts a formula (Excel, LibreOffice and Google Sheets decide by the first character)."""
    import csv
    import io

    return [c for row in csv.reader(io.StringIO(data.decode("utf-8"), newline="")) for c in row
            if c.startswith(FORMULA_STARTS)]


HOSTILE_CELLS = ['=HYPERLINK("http://x","y")', "+SUM(1,1)", "@SUM(1)", "-2+3", "\t=1", "\r=1", "=1+2"]


@pytest.fixture
async def core(pg_dsn: str, redis_url: str, tmp_path: Any) -> Any:
    from contextlib import AsyncExitStack

    from agent.core import open_core
    from agent.settings import Settings

    settings_ = Settings(database_url=pg_dsn, redis_url=redis_url, optout_default_region="US",
                         optout_journal_path=tmp_path / "journal.db")
    async with AsyncExitStack() as stack:
        c = await open_core(settings_, stack)
        await c.store.migrate()
        yield c


async def hostile_trail(core: Any) -> list[str]:
    """Audit rows whose producer-supplied ids and admin reasons start formulas (rows an older version stored,
    or ids today's rule lets through: `=1+2`, `-2+3`)."""
    import uuid

    from agent.store import Removal

    numbers = []
    for i, value in enumerate(HOSTILE_CELLS):
        number = f"+1202555{3000 + i:04d}"
        numbers.append(number)
        record = OptOutRecord.model_construct(**{**make_record(number).__dict__, "campaign_id": value,
                                                  "call_id": value, "contact_id": value, "reason": value})
        await core.store.write([record])
    await core.store.remove(Removal(numbers[0], "+SUM(1,1)", "@SUM(1)", f"remove-{uuid.uuid4()}",
                                    datetime.now(UTC), seen_seq=await core.store.head()))
    return numbers


async def test_every_csv_the_product_writes_opens_as_text_in_a_spreadsheet(
    core: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from agent import bulk, report

    numbers = await hostile_trail(core)
    outputs: dict[str, bytes] = {}
    outputs["export"] = b"".join([c async for c in bulk.export_csv(core)])
    outputs["export --audit"] = b"".join([c async for c in bulk.export_audit_csv(core, campaign_id=None,
                                                                                    number_prefix=None)])
    with monkeypatch.context() as m:  # the row-by-row path (SQLite, or a store without COPY)
        m.setattr(core.store, "blacklist_csv", lambda: None)
        m.setattr(core.store, "actions_csv", lambda *a, **k: None)
        outputs["export (rows)"] = b"".join([c async for c in bulk.export_csv(core)])
        outputs["export --audit (rows)"] = b"".join([c async for c in bulk.export_audit_csv(
            core, campaign_id=None, number_prefix=None)])
    data = await report.collect(core.store, since=None, until=None, campaign=None)
    for path in report.write_csv(data, tmp_path / "csv", full_numbers=True):
        outputs[f"report {path.name}"] = path.read_bytes()
    for name, data_ in outputs.items():
        assert formulas(data_) == [], f"{name} has cells a spreadsheet would run"
    audit = outputs["export --audit"].decode()
    assert "'=HYPERLINK" in audit and "'+SUM(1,1)" in audit and "'@SUM(1)" in audit and "'-2+3" in audit
    assert outputs["export"].splitlines()[1].startswith(b"'+1202555")
    # what `optout export` wrote imports again as the same numbers
    from agent.constants import Source

    exported = tmp_path / "blacklist.csv"
    exported.write_bytes(outputs["export"])
    with exported.open("rb") as fh:
        result = await bulk.import_numbers(core, fh, name="blacklist.csv", source=Source.ADMIN_IMPORT,
                                            reason="round trip", actor="t", workers=1)
    assert result.bad == [] and result.read == result.already == len(numbers) - 1  # the removed one is not listed


@settings(max_examples=300)
@given(st.one_of(st.text(max_size=20), st.integers(), st.floats(allow_nan=False), st.none(),
                 st.datetimes(timezones=st.just(UTC))))
def test_any_cell_is_written_as_text_a_spreadsheet_shows(value: Any) -> None:
    from agent import csvsafe

    data = csvsafe.rows_csv([[value, value]])
    assert formulas(data) == []
    from agent.csvsafe import cell, unneutralise

    plain = "" if value is None else value.isoformat() if isinstance(value, datetime) else str(value)
    assert unneutralise(cell(value)) == plain


# --- 6. masking by detection ---------------------------------------------------------------------------------------
_DIGITS = {name: "".join(chr(zero + i) for i in range(10))
           for name, zero in (("ascii", 0x30), ("arabic", 0x660), ("fullwidth", 0xFF10), ("devanagari", 0x966))}
_SEPARATORS = ["", " ", "-", ".", "/", "\u00a0", "\u2013", "\u2014", " - ", "_", "\u3000", "~", "\u2212", " / "]


@st.composite
def number_shapes(draw: Any) -> tuple[str, str]:
    """(a number in a shape `normalise` reads, its ASCII digits)."""
    digits = draw(st.sampled_from(["1", "44", "972", "49", "33", "91"])) + draw(
        st.text(alphabet="0123456789", min_size=7, max_size=11))
    script = _DIGITS[draw(st.sampled_from(sorted(_DIGITS)))]
    sep = draw(st.sampled_from(_SEPARATORS))
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=6))
    parts, at = [], 0
    for size in sizes:
        if at >= len(digits):
            break
        parts.append(digits[at:at + size])
        at += size
    if at < len(digits):
        parts.append(digits[at:])
    shaped = sep.join("".join(script[int(d)] for d in part) for part in parts)
    if draw(st.booleans()):
        shaped = "(" + shaped[:3] + ") " + shaped[3:] if sep == "" else shaped
    return (draw(st.sampled_from(["", "+", "\uff0b"])) + shaped, digits)


_CONTEXTS = ["{n}", "PJSIP/{n}-0000002a", "PJSIP/{n}-0000002a;1", "callee{n}", "number={n}", "{n}.5", "{n}:5060",
             "sip:{n}@10.0.0.1", "<tel:{n}>", "Local/{n}@optout-test-dial-00000001;2", "x{n}y", "'{n}'", "({n})",
             '{{"phoneNumber": "{n}"}}', "{n},{n}"]


@settings(max_examples=800)
@given(number_shapes(), st.sampled_from(_CONTEXTS))
def test_the_masker_finds_a_number_in_any_shape_normalise_reads(shape: tuple[str, str], context: str) -> None:
    import unicodedata

    from hypothesis import assume

    from agent.logs import _DATE, mask_numbers

    shaped, digits = shape
    assume(not _DATE.fullmatch(shaped))  # an ISO date and an 8-digit number in its shape read the same
    masked = mask_numbers(context.format(n=shaped))
    seen = "".join(str(unicodedata.digit(ch)) for ch in masked if ch.isdigit())
    assert digits not in seen, masked
    assert masked.count("*") >= len(digits) - 4, masked


def test_the_masker_leaves_ids_and_times_usable() -> None:
    from agent.logs import mask_numbers

    for text in ("2026-12-05T09:10:29.123+00:00", "ev-3f9a12345678bcd1aa", "uniqueid 1764108866.123",
                 "PJSIP/trunk-0000002a"):
        assert mask_numbers(text) == text


# --- 7. special files ----------------------------------------------------------------------------------------------
def optout_cli(env: dict[str, str], *args: str) -> Any:
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "agent.cli", *args], env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def cli_env(pg_dsn: str, redis_url: str, tmp_path: Any) -> dict[str, str]:
    import os

    e = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "REDIS_", "OPTOUT_"))}
    e.update(DATABASE_URL=pg_dsn, REDIS_URL=redis_url, OPTOUT_DEFAULT_REGION="US",
             OPTOUT_JOURNAL_PATH=str(tmp_path / "journal.db"))
    assert optout_cli(e, "migrate").returncode == 0
    return e


def test_import_refuses_anything_but_a_regular_file_with_exit_2(cli_env: dict[str, str], tmp_path: Any) -> None:
    import os

    fifo = tmp_path / "numbers.fifo"
    os.mkfifo(fifo)
    for path, kind in (("/dev/zero", "a device"), ("/dev/null", "a device"), (str(fifo), "a FIFO"),
                       (str(tmp_path), "a directory")):
        out = optout_cli(cli_env, "import", path)
        assert out.returncode == 2 and kind in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_import_names_bad_lines_by_number_with_a_masked_short_excerpt(cli_env: dict[str, str], tmp_path: Any) -> None:
    secret = "the quick brown fox jumps over the lazy dog, card 4111111111111111 exp 12/29"
    path = tmp_path / "notes.txt"
    path.write_text(f"{secret}\nmy password is hunter2-hunter2-hunter2\n+12025550123\n")
    out = optout_cli(cli_env, "import", str(path))
    assert out.returncode == 2 and "added 1" in out.stdout
    lines = out.stderr.splitlines()
    assert any(line.startswith(f"{path}:1: ") for line in lines) and any(line.startswith(f"{path}:2: ")
                                                                         for line in lines)
    assert "hunter2-hunter2" not in out.stderr and "4111111111111111" not in out.stderr
    assert "quick brown fox jumps" not in out.stderr
    assert all(len(line) < len(str(path)) + 160 for line in lines if line.startswith(str(path)))


def test_cli_free_text_and_ids_follow_the_one_rule(cli_env: dict[str, str]) -> None:
    bad = optout_cli(cli_env, "add", "+12025550123", "--reason", "line\nbreak")
    assert bad.returncode == 2 and "--reason" in bad.stderr
    assert optout_cli(cli_env, "export", "--audit", "--campaign", "a,b").returncode == 2


# --- 10. a report of any trail -------------------------------------------------------------------------------------
_MOMENTS = st.one_of(st.none(), st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(9999, 12, 29),
                                             timezones=st.sampled_from([UTC, timezone(timedelta(hours=-1))])))
_ROWS = st.fixed_dictionaries({
    "received_at": st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(9999, 12, 29),
                                timezones=st.just(UTC)),
    "pressed_at": _MOMENTS, "hungup_at": _MOMENTS, "hangup_requested_at": _MOMENTS, "visible_at": _MOMENTS,
    "cache_visible_at": _MOMENTS,
    "outcome": st.sampled_from(["blacklisted", "already_blacklisted", "number_unknown", "removed", "prevented", "x"]),
    "origin": st.sampled_from(["ari", "agi", "ami", "sns", "admin", "unknown-origin"]),
    "source": st.sampled_from(["user_optout", "admin_import"]),
    "phone_number": st.one_of(st.none(), st.just("+12025550123")),
    "campaign_id": st.one_of(st.none(), st.text(max_size=5)),
    "event_id": st.text(max_size=5), "actor": st.none(), "reason": st.text(max_size=10), "call_id": st.none()})


@settings(max_examples=400, deadline=None)
@given(st.lists(_ROWS, max_size=6))
def test_the_report_renders_any_trail(trail: list[dict[str, Any]]) -> None:
    import tempfile
    from dataclasses import fields
    from pathlib import Path

    from agent import report
    from agent.audit import ChainVerifier
    from agent.store import ActionRow

    blank = dict.fromkeys(f.name for f in fields(ActionRow))
    data = report.ReportData(since=None, until=None, campaign=None)
    for row in trail:
        data.add(ActionRow(**(blank | {"id": 1} | row)))
    html = report.render_html(data, ChainVerifier().report(), generated_at=datetime.now(UTC), title="t")
    assert html.endswith("</html>")
    with tempfile.TemporaryDirectory() as directory:
        for path in report.write_csv(data, Path(directory)):
            assert formulas(path.read_bytes()) == []


async def test_a_report_renders_an_opt_out_pressed_months_before_it_was_stored(
    pipeline: OptOutPipeline, pg_store: PostgresStore,
) -> None:
    from agent import report
    from agent.audit import ChainVerifier

    months = datetime.now(UTC) - timedelta(days=200)
    event = parse_event({"phoneNumber": "+12025550177", "timestamp": months.isoformat()}).event
    await pipeline.submit(record_from_event(event, origin=Origin.SNS, region="US"))
    for i in range(3):  # and presses of today: the months-old one is the outlier of the histogram
        await pipeline.submit(make_record(f"+1202555018{i}").model_copy(update={"pressed_at": datetime.now(UTC)}))
    data = await report.collect(pg_store, since=None, until=None, campaign=None)
    assert data.visible.count == 4
    html = report.render_html(data, ChainVerifier().report(), generated_at=datetime.now(UTC), title="t")
    assert 'id="visible-stats"' in html


async def test_a_variable_value_with_a_line_break_cannot_answer_the_next_command(
    agi_port: int, pg_store: PostgresStore,
) -> None:
    """Asterisk sends GET VARIABLE's value verbatim: an id holding a line break and a forged reply must not
    become the reply to the next GET VARIABLE (the number)."""
    for campaign in (f"x\n200 result=1 ({INJECTED})", f"x)\n200 result=1 ({INJECTED})"):
        got = await play_asterisk(agi_port, agi_request("optout"),
                                  {"CAMPAIGN_ID": campaign, "OPTOUT_NUMBER": CALLEE, "CALL_ID": "c"})
        assert got[-1] == "HANGUP"
    assert await wait_listed(pg_store, [CALLEE, INJECTED]) == {CALLEE}
    assert await pg_store.blacklisted([INJECTED]) == set()
