"""Fuzzing the parsers with hypothesis: only clear errors (naming a field), never a crash."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.constants import Origin
from agent.errors import InvalidInput, InvalidPhoneNumber
from agent.optout import parse_event, record_from_event
from agent.phone import normalise

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=20,
)
event_like = st.fixed_dictionaries(
    {},
    optional={
        "callId": json_values, "campaignId": json_values, "contactId": json_values, "dtmfInput": json_values,
        "timestamp": json_values | st.datetimes().map(lambda d: d.isoformat()), "eventId": json_values,
        "phoneNumber": json_values | st.from_regex(r"\+?[0-9 ()-]{0,20}", fullmatch=True),
    },
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(json_values, event_like))
def test_any_event_is_accepted_or_refused_with_a_named_field(data: Any) -> None:
    for candidate in (data, json.dumps(data)):
        try:
            parsed = parse_event(candidate)
            assert all(d.field and str(d).startswith(f"field {d.field}:") for d in parsed.dropped)
            record = record_from_event(parsed.event, origin=Origin.SNS, region="IL")
        except InvalidInput as exc:
            assert exc.field and str(exc).startswith(f"field {exc.field}:")
        else:
            assert record.phone_number and record.phone_number.startswith("+")


@settings(max_examples=500)
@given(st.text(max_size=80), st.sampled_from(["US", "IL", "GB", "DE", "ZZ"]))
def test_any_text_normalises_or_is_refused(raw: str, region: str) -> None:
    try:
        e164 = normalise(raw, region=region)
    except InvalidPhoneNumber as exc:
        assert exc.field == "phoneNumber"
    else:
        assert e164.startswith("+") and e164[1:].isdigit()
        assert normalise(e164, region="US") == e164  # E.164 is a fixed point


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_any_bytes_as_event_json_are_refused_cleanly(raw: bytes) -> None:
    try:
        parse_event(raw)
    except InvalidInput:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_as_fastagi_headers_parse_or_are_refused_cleanly(raw: bytes) -> None:
    import asyncio

    from agent.agi import agi_args, read_headers
    from agent.errors import AgiProtocolError

    async def parse() -> None:
        reader = asyncio.StreamReader(limit=4096)
        reader.feed_data(raw)
        reader.feed_eof()
        try:
            headers = await read_headers(reader)
        except AgiProtocolError:
            return
        assert all(k.startswith("agi_") for k in headers)
        assert all(isinstance(a, str) for a in agi_args(headers))

    asyncio.run(parse())


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.from_regex(r"agi_[a-z_0-9]{1,12}", fullmatch=True),
                       st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), max_size=30), max_size=12))
def test_well_formed_fastagi_headers_round_trip(headers: dict[str, str]) -> None:
    import asyncio

    from agent.agi import read_headers

    async def parse() -> dict[str, str]:
        reader = asyncio.StreamReader(limit=4096)
        reader.feed_data("".join(f"{k}: {v}\n" for k, v in headers.items()).encode() + b"\n")
        reader.feed_eof()
        return await read_headers(reader)

    assert asyncio.run(parse()) == headers


# --- the log masker: no full number survives, whatever stands around it -------------------------------------
_NUMBERS = st.builds(
    lambda cc, rest, sep, plus: ("+" if plus else "") + cc + sep + sep.join(
        rest[i:i + 3] for i in range(0, len(rest), 3)),
    st.sampled_from(["1", "44", "972", "49", "33"]),
    st.text(alphabet="0123456789", min_size=7, max_size=11),
    st.sampled_from(["", " ", "-", ".", "/"]),
    st.booleans(),
)
_BEFORE = st.sampled_from(["", " ", "sip:", "tel:", "<sip:", "\"", "=", "/", "(", ",", "PJSIP/", "number "])
_AFTER = st.sampled_from(["", ".", ":", "@127.0.0.1", ">", "\"", ";tag=x", ",", ")", " done", ". next", ":5060"])


@settings(max_examples=500)
@given(_NUMBERS, _BEFORE, _AFTER, st.text(alphabet="xyz !?", max_size=10))
def test_masking_leaves_no_full_number_in_any_shape(number: str, before: str, after: str, noise: str) -> None:
    from agent.logs import mask_numbers

    masked = mask_numbers(f"{noise}{before}{number}{after}{noise}")
    digits = "".join(ch for ch in number if ch.isdigit())
    assert digits not in "".join(ch for ch in masked if ch.isdigit()), masked
    assert digits[-4:] in masked.replace(" ", "").replace("-", "").replace(".", "").replace("/", "")


# --- import rows and ARI events ----------------------------------------------------------------------------
@settings(max_examples=300)
@given(st.lists(st.binary(max_size=60).filter(lambda b: b"\n" not in b and b"\x00" not in b), max_size=20))
def test_any_import_lines_give_a_number_or_a_named_problem_per_line(lines: list[bytes]) -> None:
    import io

    from agent.bulk import _parse_block, file_blocks

    data = b"phone\n" + b"\n".join(lines) + b"\n"
    blocks = file_blocks(io.BytesIO(data))
    column = next(blocks)
    seen: list[int] = []
    good = 0
    for item in blocks:
        assert isinstance(item, tuple)
        first, chunk, end = item
        block = _parse_block(first, chunk, end, None if column == -1 else int(column), "IL")
        good += len(block.good)
        seen += [lineno for lineno, problem in block.bad]
        assert all(problem.startswith("field ") for _, problem in block.bad)
        assert all(number.startswith("+") for number in block.good)
        assert block.rows == len(block.good) + len(block.bad)
    assert seen == sorted(seen) and all(2 <= n <= len(lines) + 1 for n in seen)
    assert good + len(seen) == sum(1 for line in lines if line.decode("utf-8", "replace").strip())


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(json_values)
def test_any_ari_event_is_handled_or_skipped_and_never_half_taken(event: Any) -> None:
    import asyncio

    from agent.ari import AriAgent

    class NoIntake:
        digit = "9"
        presses = 0

        def seen(self, uniqueid: str) -> bool:
            return False

        def arrived(self, *a: Any) -> None: ...

        def hangup_seen(self, *a: Any) -> None: ...

        def press(self, *a: Any, **k: Any) -> None:
            self.presses += 1

    async def feed() -> int:
        intake = NoIntake()
        agent = AriAgent(url="http://127.0.0.1:1", username="u", password="p", app="a", intake=intake)  # type: ignore[arg-type]
        for candidate in (event, {"type": "ChannelDtmfReceived", "digit": "9", "timestamp": event,
                                  "channel": {"id": "c1", "channelvars": {"OPTOUT_NUMBER": "+972501234567"}}}):
            agent._on_event(candidate)
        return intake.presses

    assert asyncio.run(feed()) == 1, "a press with any timestamp is taken, exactly once"
