"""Phone normalisation, event parsing and event ids: the rules that touch no I/O."""

from __future__ import annotations

import pytest

from agent.constants import Origin
from agent.errors import InvalidInput, InvalidPhoneNumber
from agent.logs import mask_numbers
from agent.optout import parse_event, record_from_event
from agent.phone import mask, normalise


def parse_event_ok(data: object):  # type: ignore[no-untyped-def]
    parsed = parse_event(data)
    assert parsed.dropped == []
    return parsed.event

EVENT = {
    "callId": "call-123", "campaignId": "campaign-456", "contactId": "contact-789",
    "phoneNumber": "+972501234567", "dtmfInput": "9", "timestamp": "2024-01-15T10:30:00Z",
}


@pytest.mark.parametrize("raw", ["050-123-4567", "0501234567", "+972 50 123 4567", "+972501234567"])
def test_israeli_formats_are_one_e164_number(raw: str) -> None:
    assert normalise(raw, region="IL") == "+972501234567"


def test_invalid_number_names_the_field_and_region() -> None:
    with pytest.raises(InvalidPhoneNumber) as err:
        normalise("050-123", region="IL", field="phoneNumber")
    assert err.value.field == "phoneNumber"
    assert "is too short (read in region IL)" in str(err.value)


@pytest.mark.parametrize("raw", ["", "   ", "abc", "+1", "9" * 70])
def test_garbage_numbers_are_rejected(raw: str) -> None:
    with pytest.raises(InvalidPhoneNumber):
        normalise(raw, region="US")


def test_non_string_number_is_rejected_with_its_type() -> None:
    with pytest.raises(InvalidPhoneNumber, match="expected a string, got int"):
        normalise(972501234567, region="IL")


def test_event_keeps_camel_case_names_in_and_out() -> None:
    record = record_from_event(parse_event_ok(EVENT), origin=Origin.SNS, region="IL")
    out = record.event_json()
    for key in ("callId", "campaignId", "contactId", "phoneNumber", "dtmfInput", "timestamp", "eventId", "origin"):
        assert key in out
    assert out["timestamp"] == "2024-01-15T10:30:00Z"
    assert out["phoneNumber"] == "+972501234567"


def test_same_event_always_has_the_same_id_and_national_format_does_not_change_it() -> None:
    a = record_from_event(parse_event_ok(EVENT), origin=Origin.SNS, region="IL")
    b = record_from_event(parse_event_ok({**EVENT, "phoneNumber": "050-123-4567"}), origin=Origin.SNS, region="IL")
    c = record_from_event(parse_event_ok({**EVENT, "callId": "call-124"}), origin=Origin.SNS, region="IL")
    assert a.event_id == b.event_id
    assert a.event_id != c.event_id


def test_explicit_event_id_is_kept_as_the_source_and_the_identity_includes_the_number() -> None:
    rec = record_from_event(parse_event_ok({**EVENT, "eventId": "abc-1"}), origin=Origin.SNS, region="IL")
    other = record_from_event(parse_event_ok({**EVENT, "eventId": "abc-1", "phoneNumber": "+972521234567"}),
                              origin=Origin.SNS, region="IL")
    again = record_from_event(parse_event_ok({**EVENT, "eventId": "abc-1", "callId": "other"}), origin=Origin.SNS,
                              region="IL")
    assert rec.source_event_id == "abc-1" and rec.event_id != other.event_id and rec.event_id == again.event_id


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({k: v for k, v in EVENT.items() if k != "phoneNumber"}, "phoneNumber"),
        ({**EVENT, "phoneNumber": "+97250\x001234567"}, "phoneNumber"),
        ("not json", "event"),
        ("[" * 100_000, "event"),
        ([1, 2], "event"),
    ],
)
def test_bad_events_name_the_field(data: object, field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_event(data)
    assert err.value.field == field


@pytest.mark.parametrize(
    ("bad", "field", "problem"),
    [
        ({"timestamp": "yesterday"}, "timestamp", "datetime"),
        ({"callId": "x" * 500}, "callId", "more than 128"),
        ({"campaignId": "camp\x00"}, "campaignId", "nul"),
        ({"contactId": "c\ud800"}, "contactId", "surrogate"),
        ({"eventId": "e\x07"}, "eventId", "control"),
    ],
)
def test_a_bad_optional_field_is_dropped_and_named_never_the_optout(bad: dict[str, str], field: str,
                                                                   problem: str) -> None:
    parsed = parse_event({**EVENT, **bad})
    [dropped] = parsed.dropped
    assert dropped.field == field and problem in str(dropped).lower()
    record = record_from_event(parsed.event, origin=Origin.SNS, region="IL")
    assert record.phone_number == "+972501234567"


def test_records_from_a_channel_clean_what_the_store_cannot_hold() -> None:
    from datetime import UTC, datetime

    from agent.optout import OptOutRecord

    rec = OptOutRecord(event_id="e", phone_number="+972501234567", origin=Origin.ARI, received_at=datetime.now(UTC),
                       campaign_id="camp\x00\ud800" + "x" * 300, channel={"name": "Jos\xe9\x00", "n": [1, "a\x00"]})
    assert rec.campaign_id is not None and "\x00" not in rec.campaign_id and len(rec.campaign_id) == 128
    rec.campaign_id.encode("utf-8")
    assert rec.channel == {"name": "Jos\xe9", "n": [1, "a"]}


def test_mask_keeps_last_four_digits() -> None:
    assert mask("+972501234567") == "+********4567"


def test_log_masking_hides_numbers_in_any_format_but_keeps_ids_and_times() -> None:
    text = 'number +972501234567 and 050-123-4567 at 2024-01-15T10:30:00Z id call-123 port 8088'
    masked = mask_numbers(text)
    assert "+972501234567" not in masked and "050-123-4567" not in masked
    assert "4567" in masked and "2024-01-15T10:30:00Z" in masked and "8088" in masked
