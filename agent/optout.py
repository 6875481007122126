"""The opt-out domain: events, blacklist entries and audit records. No I/O.

JSON in and out keeps the camelCase names producers already use:
`{"callId":"call-123","campaignId":"campaign-456","contactId":"contact-789",
  "phoneNumber":"+972501234567","dtmfInput":"9","timestamp":"2024-01-15T10:30:00Z"}`

One rule for text from outside, used by every way in (SNS, FastAGI, AMI, ARI variables, `POST /calls`, the
CLI): `id_problem` for identifiers (call, campaign, contact and event ids), `text_problem` for free text
(reasons, names). Identifiers travel on through parsers that split on characters (Asterisk's application
arguments split on `,` outside quotes, brackets and parentheses, and honour `"` and `\\`; AGI, AMI and log
lines end at CR or LF; a CSV row ends at a newline), so an identifier is 1 to ID_MAX printable characters
and none of ID_FORBIDDEN. Free text may hold any printable character but no control, format or
line-separator character. What breaks the rule is refused where a person or producer sent it (an event's
optional field is dropped and reported by `parse_event`, the number never is; `POST /calls` and the CLI
answer with the field's name) and cleaned or dropped where a channel carries it (the press still counts).

A timestamp that cannot be represented in UTC between TIME_MIN and TIME_MAX (.NET's
`0001-01-01T00:00:00+01:00`) is refused at parse time naming its field: stored, it would fail every later
step that converts it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.constants import Origin, Outcome, Source
from agent.errors import InvalidInput
from agent.phone import normalise

ID_MAX = 128
TEXT_MAX = 1000
ID_FORBIDDEN = ',"\\()[]{}^|'
"""Characters an identifier may not hold: Asterisk's argument separators, quotes, escapes and brackets
(`AGI()`, `Gosub()`, `ExecIf()` arguments), the old `|` separator and the expression/variable brackets."""
TIME_MIN = datetime(1970, 1, 1, tzinfo=UTC)
TIME_MAX = datetime(9999, 12, 30, tzinfo=UTC)
"""Timestamps outside [TIME_MIN, TIME_MAX) are refused: before the Unix epoch no opt-out was made, and past
TIME_MAX a day's arithmetic or a time-zone offset overflows."""
_NOT_PRINTABLE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
"""Unicode categories refused everywhere: controls (NUL, TAB, CR, LF, ESC...), format characters (zero-width,
bidirectional overrides), lone surrogates, line and paragraph separators."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def _unprintable(value: str) -> str | None:
    for ch in value:
        if ch.isprintable():
            continue
        kind = unicodedata.category(ch)
        if kind in _NOT_PRINTABLE:
            if ch == "\x00":
                return "contains a NUL character"
            if kind == "Cs":
                return "contains a lone surrogate (not valid Unicode)"
            if ch in "\r\n":
                return "contains a line break (CR or LF)"
            return f"contains the control or format character U+{ord(ch):04X}"
    return None


def text_problem(value: str, max_len: int) -> str | None:
    """Why `value` is not acceptable free text (None when it is): a control or format character (NUL, CR,
    LF, TAB...), a lone surrogate, or more than `max_len` characters."""
    if len(value) > max_len:
        return f"is {len(value)} characters long, more than {max_len}"
    return _unprintable(value)


def id_problem(value: str, max_len: int = ID_MAX) -> str | None:
    """Why `value` is not an acceptable identifier (None when it is): empty, longer than `max_len`, a
    character `text_problem` refuses, or one of ID_FORBIDDEN."""
    if not value:
        return "is empty"
    if (problem := text_problem(value, max_len)) is not None:
        return problem
    if bad := sorted({ch for ch in value if ch in ID_FORBIDDEN}):
        return f"contains {' '.join(repr(ch) for ch in bad)}, which an identifier may not hold"
    return None


def clean_text(value: str, max_len: int) -> str:
    """`value` made acceptable free text: every character `text_problem` refuses removed (a TAB, CR or LF
    becomes a space), cut at `max_len` characters."""
    if _unprintable(value) is not None:
        value = "".join(" " if ch in "\t\r\n" else ch for ch in value
                        if ch in "\t\r\n" or unicodedata.category(ch) not in _NOT_PRINTABLE)
    return value[:max_len]


def clean_id(value: object, max_len: int = ID_MAX) -> str | None:
    """`value` made an acceptable identifier, for identifiers a channel carries (the press still counts):
    every character `id_problem` refuses removed, stripped, cut at `max_len`; None when nothing is left."""
    if not isinstance(value, str):
        return None
    if id_problem(value.strip(), max_len) is not None:
        value = "".join(ch for ch in clean_text(value, len(value)) if ch not in ID_FORBIDDEN)
    return value.strip()[:max_len].strip() or None


def utc_problem(value: datetime) -> str | None:
    """Why `value` cannot be stored as a moment (None when it can)."""
    try:
        utc = value.astimezone(UTC) if value.tzinfo is not None else value.replace(tzinfo=UTC)
    except (OverflowError, ValueError):
        return f"{value.isoformat()} cannot be represented in UTC"
    if not TIME_MIN <= utc < TIME_MAX:
        return f"{value.isoformat()} is outside {TIME_MIN.year} to {TIME_MAX.year}"
    return None


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


def _refuse_bad_id(value: Any, max_len: int = ID_MAX) -> Any:
    if isinstance(value, str) and (problem := id_problem(value.strip(), max_len)) is not None:
        raise ValueError(problem)
    return value


def _refuse_bad_text(value: Any, max_len: int) -> Any:
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
    def _identifier(cls, value: Any) -> Any:
        return _refuse_bad_id(value)

    @field_validator("dtmf_input", mode="before")
    @classmethod
    def _digits(cls, value: Any) -> Any:
        return _refuse_bad_id(value, 16)

    @field_validator("phone_number", mode="before")
    @classmethod
    def _number_text(cls, value: Any) -> Any:
        return _refuse_bad_text(value, 64)

    @field_validator("timestamp")
    @classmethod
    def _representable(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        if (problem := utc_problem(value)) is not None:
            raise ValueError(problem)
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


_SOURCES = frozenset(s.value for s in Source)
_WHITE_SPACE = (" \t\n\x0b\x0c\r\x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
                + "\u2028\u2029\u202f\u205f\u3000")
"""What pydantic's str_strip_whitespace strips (Unicode White_Space; Python's own strip() also takes
\\x1c-\\x1f)."""


def entry_json(phone_number: str, added_at: datetime, reason: str, source: str,
               metadata: dict[str, Any] | None) -> str | None:
    """The JSON `BlacklistEntry.to_json` writes, built without validating (the keeper writes one per store
    change, millions for an import): None when the values are not a valid entry (the caller validates)."""
    if source not in _SOURCES or not isinstance(reason, str) or not isinstance(phone_number, str) \
            or not isinstance(added_at, datetime) or added_at.tzinfo is None:
        return None
    head = '{"phoneNumber":' + json.dumps(phone_number.strip(_WHITE_SPACE), ensure_ascii=False)
    if metadata is None:  # an import's rows share everything but the number
        return head + _entry_tail(added_at, reason, source)
    tail = json.dumps({"addedAt": added_at.isoformat().replace("+00:00", "Z"),
                       "reason": reason.strip(_WHITE_SPACE), "source": source, "metadata": metadata},
                      ensure_ascii=False, separators=(",", ":"))
    return head + "," + tail[1:]


@functools.lru_cache(maxsize=256)
def _entry_tail(added_at: datetime, reason: str, source: str) -> str:
    tail = json.dumps({"addedAt": added_at.isoformat().replace("+00:00", "Z"),
                       "reason": reason.strip(_WHITE_SPACE), "source": source}, ensure_ascii=False,
                      separators=(",", ":"))
    return "," + tail[1:]


class HangupInfo(_Camel):
    """How the call was ended, with Asterisk's own timestamp where it reported one."""

    requested_at: datetime | None = Field(default=None, alias="requestedAt")
    hungup_at: datetime | None = Field(default=None, alias="hungupAt")
    method: str | None = None
    result: str | None = None
    """`ok`, `gone`, `timeout`, `not-found`, or `error: ...` with the far end's words (cleaned, cut)."""

    @field_validator("method", "result", mode="before")
    @classmethod
    def _clean(cls, value: Any) -> Any:
        """Far-end text (an AGI reply, an HTTP error) is cleaned and cut before anything stores it."""
        return clean_text(value, 200) if isinstance(value, str) else value

    @property
    def ok(self) -> bool:
        """The hangup request was accepted (the channel was up)."""
        return self.result == "ok"

    @classmethod
    def failed(cls, method: str, exc: Exception, *, requested_at: datetime) -> HangupInfo:
        """A hangup request that raised `exc` (ARI, AMI, the worker endpoint): `timeout`, or `error: ...`."""
        why = "timeout" if isinstance(exc, TimeoutError) else f"error: {exc or type(exc).__name__}"
        return cls(requested_at=requested_at, method=method, result=why)


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

    @field_validator("event_id", "raw_number", "number_source", "digit", "actor", mode="before")
    @classmethod
    def _clean_short(cls, value: Any) -> Any:
        return clean_text(value, ID_MAX) if isinstance(value, str) else value

    @field_validator("source_event_id", "call_id", "campaign_id", "contact_id", mode="before")
    @classmethod
    def _identifier(cls, value: Any) -> Any:
        """An identifier that breaks the rule is cleaned (the opt-out is never lost for it)."""
        return clean_id(value) if isinstance(value, str) else value

    @field_validator("pressed_at", "journaled_at", "visible_at")
    @classmethod
    def _representable(cls, value: datetime | None) -> datetime | None:
        """A moment that cannot be represented (journaled before it was refused at parse time) is left out."""
        return None if value is not None and utc_problem(value) is not None else value

    @field_validator("reason", mode="before")
    @classmethod
    def _clean_reason(cls, value: Any) -> Any:
        return clean_text(value, TEXT_MAX) if isinstance(value, str) else value

    @field_validator("channel", mode="before")
    @classmethod
    def _clean_channel(cls, value: Any) -> Any:
        return clean_json(value) if isinstance(value, dict) else value

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


def recovered_record(number: str, entry_json: str | None, *, lineage: str, listed_at: int,
                     back_to: int) -> OptOutRecord:
    """The opt-out that puts back a number the store lost when it went back (the cache keeper found it listed in
    Redis at store change `listed_at` of `lineage`); its id is the same in every keeper that finds it."""
    try:
        entry: BlacklistEntry | None = BlacklistEntry.model_validate_json(entry_json or "")
    except ValueError:
        entry = None
    return OptOutRecord(
        event_id="recovered-" + _digest(number, lineage), phone_number=number, number_source="redis view",
        origin=Origin.ADMIN, source=entry.source if entry else Source.COMPLIANCE, actor="optout-agent",
        reason=(f"recovered: listed in Redis at store change {listed_at}, lost when the store went back to change "
                f"{back_to}" + (f" (was: {entry.reason})" if entry else "")),
        received_at=entry.added_at if entry else utcnow(),
    )
