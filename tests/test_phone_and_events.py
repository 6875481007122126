"""Phone normalisation, event parsing and event ids: the rules that touch no I/O."""

from __future__ import annotations

import pytest

from agent.constants import Origin
from agent.errors import InvalidInput, InvalidPhoneNumber
from agent.logs import mask_numbers
from agent.optout import parse_event, record_from_event
from agent.phone import mask, normalise

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
    record = record_from_event(parse_event(EVENT), origin=Origin.SNS, region="IL")
    out = record.event_json()
    for key in ("callId", "campaignId", "contactId", "phoneNumber", "dtmfInput", "timestamp", "eventId", "origin"):
        assert key in out
    assert out["timestamp"] == "2024-01-15T10:30:00Z"
    assert out["phoneNumber"] == "+972501234567"


def test_same_event_always_has_the_same_id_and_national_format_does_not_change_it() -> None:
    a = record_from_event(parse_event(EVENT), origin=Origin.SNS, region="IL")
    b = record_from_event(parse_event({**EVENT, "phoneNumber": "050-123-4567"}), origin=Origin.SNS, region="IL")
    c = record_from_event(parse_event({**EVENT, "callId": "call-124"}), origin=Origin.SNS, region="IL")
    assert a.event_id == b.event_id
    assert a.event_id != c.event_id


def test_explicit_event_id_is_kept() -> None:
    rec = record_from_event(parse_event({**EVENT, "eventId": "abc-1"}), origin=Origin.SNS, region="IL")
    assert rec.event_id == "abc-1"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({k: v for k, v in EVENT.items() if k != "phoneNumber"}, "phoneNumber"),
        ({**EVENT, "timestamp": "yesterday"}, "timestamp"),
        ({**EVENT, "callId": "x" * 500}, "callId"),
        ("not json", "event"),
        ([1, 2], "event"),
    ],
)
def test_bad_events_name_the_field(data: object, field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_event(data)
    assert err.value.field == field


def test_mask_keeps_last_four_digits() -> None:
    assert mask("+972501234567") == "+********4567"


def test_log_masking_hides_numbers_in_any_format_but_keeps_ids_and_times() -> None:
    text = 'number +972501234567 and 050-123-4567 at 2024-01-15T10:30:00Z id call-123 port 8088'
    masked = mask_numbers(text)
    assert "+972501234567" not in masked and "050-123-4567" not in masked
    assert "4567" in masked and "2024-01-15T10:30:00Z" in masked and "8088" in masked
