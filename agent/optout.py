"""The opt-out domain: events, blacklist entries and audit records. No I/O.

JSON in and out keeps the camelCase names producers already use:
`{"callId":"call-123","campaignId":"campaign-456","contactId":"contact-789",
  "phoneNumber":"+972501234567","dtmfInput":"9","timestamp":"2024-01-15T10:30:00Z"}`
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.constants import Origin, Outcome, Source
from agent.errors import InvalidInput
from agent.phone import normalise

_ID_MAX = 128


def utcnow() -> datetime:
    return datetime.now(UTC)


class _Camel(BaseModel):
    model_config = ConfigDict(populate_by_name=True, frozen=True, extra="ignore", str_strip_whitespace=True)


class OptOutEvent(_Camel):
    """An opt-out as producers publish it (SNS, ARI, AGI, AMI and the CLI all build one)."""

    call_id: str | None = Field(default=None, alias="callId", max_length=_ID_MAX)
    campaign_id: str | None = Field(default=None, alias="campaignId", max_length=_ID_MAX)
    contact_id: str | None = Field(default=None, alias="contactId", max_length=_ID_MAX)
    phone_number: str = Field(alias="phoneNumber", max_length=64)
    dtmf_input: str | None = Field(default=None, alias="dtmfInput", max_length=16)
    timestamp: datetime | None = None
    event_id: str | None = Field(default=None, alias="eventId", max_length=_ID_MAX)

    @field_validator("timestamp")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class BlacklistEntry(_Camel):
    """A number on the do-not-call list, as the dialers read it from `blacklist:{phoneNumber}`."""

    phone_number: str = Field(alias="phoneNumber")
    added_at: datetime = Field(alias="addedAt")
    reason: str
    source: Source
    metadata: dict[str, Any] | None = None

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True)


class HangupInfo(_Camel):
    """How the call was ended, with Asterisk's own timestamp where it reported one."""

    requested_at: datetime | None = Field(default=None, alias="requestedAt")
    hungup_at: datetime | None = Field(default=None, alias="hungupAt")
    method: str | None = None
    result: str | None = None


class OptOutRecord(_Camel):
    """A validated, normalised opt-out: what the journal holds and the store writes (one audit row)."""

    event_id: str = Field(alias="eventId")
    phone_number: str | None = Field(alias="phoneNumber")
    raw_number: str | None = Field(default=None, alias="rawNumber")
    call_id: str | None = Field(default=None, alias="callId")
    campaign_id: str | None = Field(default=None, alias="campaignId")
    contact_id: str | None = Field(default=None, alias="contactId")
    origin: Origin
    source: Source = Source.USER_OPTOUT
    reason: str = "caller pressed the opt-out digit"
    digit: str | None = None
    pressed_at: datetime | None = Field(default=None, alias="pressedAt")
    received_at: datetime = Field(alias="receivedAt")
    hangup: HangupInfo | None = None
    actor: str | None = None
    channel: dict[str, Any] | None = None

    @property
    def number_known(self) -> bool:
        return self.phone_number is not None

    def entry(self) -> BlacklistEntry:
        """The blacklist entry this record adds (its `addedAt` is when the agent received it)."""
        assert self.phone_number is not None
        return BlacklistEntry(
            phone_number=self.phone_number,
            added_at=self.received_at,
            reason=self.reason,
            source=self.source,
            metadata=self.metadata(),
        )

    def metadata(self) -> dict[str, Any] | None:
        meta = {
            "callId": self.call_id,
            "campaignId": self.campaign_id,
            "contactId": self.contact_id,
            "timestamp": self.pressed_at.isoformat().replace("+00:00", "Z") if self.pressed_at else None,
        }
        kept = {k: v for k, v in meta.items() if v is not None}
        return kept or None

    def event_json(self) -> dict[str, Any]:
        """The event in its published shape: the input fields plus eventId and origin."""
        return {
            "eventId": self.event_id,
            "origin": self.origin.value,
            "callId": self.call_id,
            "campaignId": self.campaign_id,
            "contactId": self.contact_id,
            "phoneNumber": self.phone_number,
            "dtmfInput": self.digit,
            "timestamp": self.pressed_at.isoformat().replace("+00:00", "Z") if self.pressed_at else None,
        }

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> OptOutRecord:
        return cls.model_validate_json(text)

    def outcome(self, newly_blacklisted: bool) -> Outcome:
        if not self.number_known:
            return Outcome.NUMBER_UNKNOWN
        return Outcome.BLACKLISTED if newly_blacklisted else Outcome.ALREADY_BLACKLISTED


def parse_event(data: Any) -> OptOutEvent:
    """Validate one event (a dict or JSON text). Raises InvalidInput naming the first bad field."""
    try:
        if isinstance(data, str | bytes):
            return OptOutEvent.model_validate_json(data)
        if not isinstance(data, dict):
            raise InvalidInput("event", f"expected a JSON object, got {type(data).__name__}")
        return OptOutEvent.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "event"
        raise InvalidInput(loc, err["msg"].lower()) from None


def derive_event_id(event: OptOutEvent, phone_number: str) -> str:
    """The id of an event: its own `eventId`, else a digest of its content, so a redelivery has the same id."""
    if event.event_id:
        return event.event_id
    canonical = json.dumps(
        [
            event.call_id,
            event.campaign_id,
            event.contact_id,
            phone_number,
            event.dtmf_input,
            event.timestamp.isoformat() if event.timestamp else None,
        ],
        separators=(",", ":"),
    )
    return "ev-" + hashlib.sha256(canonical.encode()).hexdigest()[:32]


def call_event_id(call_key: str) -> str:
    """The id of the one opt-out a call can make (ARI, AGI and AMI agree on it: one press, one opt-out)."""
    return "call-" + hashlib.sha256(call_key.encode()).hexdigest()[:32]


def record_from_event(
    event: OptOutEvent,
    *,
    origin: Origin,
    region: str,
    received_at: datetime | None = None,
    source: Source = Source.USER_OPTOUT,
    reason: str | None = None,
) -> OptOutRecord:
    """Validate and normalise an event into the record the pipeline stores. Raises InvalidInput."""
    number = normalise(event.phone_number, region=region, field="phoneNumber")
    return OptOutRecord(
        event_id=derive_event_id(event, number),
        phone_number=number,
        call_id=event.call_id,
        campaign_id=event.campaign_id,
        contact_id=event.contact_id,
        origin=origin,
        source=source,
        reason=reason or "caller pressed the opt-out digit",
        digit=event.dtmf_input,
        pressed_at=event.timestamp,
        received_at=received_at or utcnow(),
    )
