"""The opt-out domain: events, blacklist entries and audit records. No I/O.

JSON in and out keeps the camelCase names producers already use:
`{"callId":"call-123","campaignId":"campaign-456","contactId":"contact-789",
  "phoneNumber":"+972501234567","dtmfInput":"9","timestamp":"2024-01-15T10:30:00Z"}`

Text that the store cannot hold (a NUL, a lone surrogate, control characters, more than the column's
length) is refused at the boundary: in an event from a producer the bad field is dropped and reported
(`parse_event`), and in a record built from a channel it is cleaned. The opt-out itself is never dropped
for a bad field other than the number.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.constants import Origin, Outcome, Source
from agent.errors import InvalidInput
from agent.phone import normalise

ID_MAX = 128
TEXT_MAX = 1000
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def utcnow() -> datetime:
    return datetime.now(UTC)


def text_problem(value: str, max_len: int) -> str | None:
    """Why the store could not hold `value` as given (None when it can)."""
    if "\x00" in value:
        return "contains a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone surrogate (not valid Unicode)"
    if _CONTROL.search(value):
        return "contains control characters"
    if len(value) > max_len:
        return f"is {len(value)} characters long, more than {max_len}"
    return None


def clean_text(value: str, max_len: int) -> str:
    """`value` made storable: control characters (NUL included) removed, lone surrogates replaced, cut at
    `max_len` characters."""
    value = _CONTROL.sub("", value)
    if text_problem(value, max_len) is not None:
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value[:max_len]


def clean_json(value: Any, *, depth: int = 0) -> Any:
    """A JSON-like value (channel data) with every string cleaned and nesting bounded."""
    if depth > 4:
        return None
    if isinstance(value, str):
        return clean_text(value, TEXT_MAX)
    if isinstance(value, dict):
        return {clean_text(str(k), ID_MAX): clean_json(v, depth=depth + 1) for k, v in list(value.items())[:64]}
    if isinstance(value, list | tuple):
        return [clean_json(v, depth=depth + 1) for v in value[:64]]
    if value is None or isinstance(value, bool | int | float):
        return value
    return clean_text(str(value), TEXT_MAX)


def iso_z(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


class _Camel(BaseModel):
    model_config = ConfigDict(populate_by_name=True, frozen=True, extra="ignore", str_strip_whitespace=True)


def _refuse_unstorable(value: Any, max_len: int) -> Any:
    if isinstance(value, str) and (problem := text_problem(value, max_len)) is not None:
        raise ValueError(problem)
    return value


class OptOutEvent(_Camel):
    """An opt-out as producers publish it (SNS, and the CLI); every field but phoneNumber is optional."""

    call_id: str | None = Field(default=None, alias="callId")
    campaign_id: str | None = Field(default=None, alias="campaignId")
    contact_id: str | None = Field(default=None, alias="contactId")
    phone_number: str = Field(alias="phoneNumber", max_length=64)
    dtmf_input: str | None = Field(default=None, alias="dtmfInput", max_length=16)
    timestamp: datetime | None = None
    event_id: str | None = Field(default=None, alias="eventId")

    @field_validator("call_id", "campaign_id", "contact_id", "event_id", mode="before")
    @classmethod
    def _storable_id(cls, value: Any) -> Any:
        return _refuse_unstorable(value, ID_MAX)

    @field_validator("phone_number", "dtmf_input", mode="before")
    @classmethod
    def _storable_text(cls, value: Any) -> Any:
        return _refuse_unstorable(value, 64)

    @field_validator("timestamp")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


@dataclass(frozen=True)
class ParsedEvent:
    event: OptOutEvent
    dropped: list[InvalidInput] = field(default_factory=list)
    """Optional fields that were invalid and left out (the opt-out still applies)."""


_OPTIONAL = {"callId": "call_id", "campaignId": "campaign_id", "contactId": "contact_id",
             "dtmfInput": "dtmf_input", "timestamp": "timestamp", "eventId": "event_id"}


def parse_event(data: Any) -> ParsedEvent:
    """Validate one event (a dict or JSON text).

    A bad optional field is dropped and listed in `dropped` (field and problem); a bad or missing
    phoneNumber, or input that is not a JSON object, raises InvalidInput naming the field.
    """
    if isinstance(data, str | bytes):
        try:
            data = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise InvalidInput("event", f"not JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise InvalidInput("event", f"expected a JSON object, got {type(data).__name__}")
    dropped: list[InvalidInput] = []
    for _ in range(len(_OPTIONAL) + 1):
        try:
            return ParsedEvent(OptOutEvent.model_validate(data), dropped)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = str(err["loc"][0]) if err["loc"] else "event"
            alias = next((a for a, name in _OPTIONAL.items() if loc in (a, name)), None)
            if alias is None:
                raise InvalidInput(loc, err["msg"].lower().removeprefix("value error, ")) from None
            dropped.append(InvalidInput(alias, err["msg"].lower().removeprefix("value error, ")))
            data = {k: v for k, v in data.items() if k not in (alias, _OPTIONAL[alias])}
    raise InvalidInput("event", "too many invalid fields")  # pragma: no cover - each round drops one


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

    @property
    def ok(self) -> bool:
        """The hangup request was accepted (the channel was up)."""
        return self.result == "ok"


class SpeechEvidence(_Camel):
    """What an utterance said, as the audit row keeps it (agent/speech): personal data, like the number."""

    transcript: str
    score: float
    phrase: str | None = None
    audio_sha256: str = Field(alias="audioSha256", pattern=r"^[0-9a-f]{64}$")

    @field_validator("transcript", "phrase", mode="before")
    @classmethod
    def _clean(cls, value: Any) -> Any:
        return clean_text(value, TEXT_MAX) if isinstance(value, str) else value

    def columns(self) -> dict[str, str | None]:
        """The audit row's speech columns (the score as fixed text, so the hash chain reads it back the same)."""
        return {"speech_transcript": self.transcript, "speech_score": f"{self.score:.3f}",
                "speech_phrase": self.phrase, "speech_audio_sha256": self.audio_sha256}


class OptOutRecord(_Camel):
    """A validated, normalised opt-out: what the journal holds and the store writes (one audit row).

    Every text field is cleaned on construction, so whatever reaches the journal and the store can be
    held by both.
    """

    event_id: str = Field(alias="eventId")
    source_event_id: str | None = Field(default=None, alias="sourceEventId")
    phone_number: str | None = Field(alias="phoneNumber")
    number_source: str | None = Field(default=None, alias="numberSource")
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
    journaled_at: datetime | None = Field(default=None, alias="journaledAt")
    visible_at: datetime | None = Field(default=None, alias="visibleAt")
    hangup: HangupInfo | None = None
    actor: str | None = None
    channel: dict[str, Any] | None = None
    speech: SpeechEvidence | None = None
    """Origin speech: the utterance (transcript, score, phrase, SHA-256 of its audio)."""

    @field_validator("event_id", "source_event_id", "call_id", "campaign_id", "contact_id", "raw_number",
                     "number_source", "digit", "actor", mode="before")
    @classmethod
    def _clean_id(cls, value: Any) -> Any:
        return clean_text(value, ID_MAX) if isinstance(value, str) else value

    @field_validator("reason", mode="before")
    @classmethod
    def _clean_reason(cls, value: Any) -> Any:
        return clean_text(value, TEXT_MAX) if isinstance(value, str) else value

    @field_validator("channel", mode="before")
    @classmethod
    def _clean_channel(cls, value: Any) -> Any:
        return clean_json(value) if isinstance(value, dict) else value

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
            "timestamp": iso_z(self.pressed_at) if self.pressed_at else None,
        }
        kept = {k: v for k, v in meta.items() if v is not None}
        return kept or None

    def event_json(self) -> dict[str, Any]:
        """The event in its published shape (the producers' schema plus eventId and origin). A record
        without a number has no phoneNumber: it is published under its own event type."""
        out = {
            "eventId": self.event_id,
            "origin": self.origin.value,
            "callId": self.call_id,
            "campaignId": self.campaign_id,
            "contactId": self.contact_id,
            "phoneNumber": self.phone_number,
            "dtmfInput": self.digit,
            "timestamp": iso_z(self.pressed_at or self.received_at),
        }
        if self.phone_number is None:
            del out["phoneNumber"]
        return out

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> OptOutRecord:
        return cls.model_validate_json(text)


def outcome_of(record: OptOutRecord, *, already_listed: bool) -> Outcome:
    if record.phone_number is None:
        return Outcome.NUMBER_UNKNOWN
    return Outcome.ALREADY_BLACKLISTED if already_listed else Outcome.BLACKLISTED


def _digest(*parts: str | None) -> str:
    return hashlib.sha256("\x1f".join(p or "" for p in parts).encode("utf-8", "replace")).hexdigest()[:32]


def derive_event_id(event: OptOutEvent, phone_number: str) -> str:
    """The id of an event's opt-out. It always includes the number: a producer's `eventId` reused for
    another number names another opt-out (stored, never answered "duplicate"); without an `eventId` it
    is a digest of the content, so a redelivery has the same id."""
    if event.event_id:
        return "ev-" + _digest(event.event_id, phone_number)
    return "ev-" + _digest(
        event.call_id, event.campaign_id, event.contact_id, phone_number, event.dtmf_input,
        event.timestamp.isoformat() if event.timestamp else None,
    )


def call_event_id(call_key: str, phone_number: str | None) -> str:
    """The id of the one opt-out a call can make: ARI, AGI and AMI see the same channel uniqueid and derive
    the same number, so one press makes one opt-out."""
    return "call-" + _digest(call_key, phone_number)


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
        source_event_id=event.event_id,
        phone_number=number,
        number_source="phoneNumber",
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
