"""What every telephony way in (ARI, AGI, AMI) shares: a channel's facts -> the opt-out record. No I/O.

Which number opts out: only one the call can prove is the callee's, first valid wins:
  1. the channel variable OPTOUT_NUMBER, which the dialer sets on each call (it knows whom it called);
  2. the number Asterisk dialled: the user part of `CHANNEL(pjsip,remote_uri)` on an *outbound* PJSIP
     channel, i.e. one whose `CHANNEL(pjsip,request_uri)` is empty (it is set only on incoming INVITEs).
     That URI is what Asterisk itself put in the INVITE's To; a far end cannot change it.
Never trusted (checked on Asterisk 22.10.1): the channel's caller ID (on an originated channel it is the
dialer's own number); the connected line (on a channel originated over ARI or AMI it is the originate's
caller ID, and nothing tells an update from the far end, e.g. a forwarded-to number, from one made by
the dialplan); the dialled extension (`s`); FastAGI's `agi_dnid` (`unknown` on outbound channels, our own
number on inbound ones); DIALEDPEERNUMBER (Dial() sets it on the dialling channel too, where it names
someone else); `remote_uri` on an inbound channel (that is the caller).
Where no number is proven, the record is a number-unknown opt-out carrying the channel's data: the call
is still ended and the press is audited, and no number is listed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

from agent.constants import Origin
from agent.errors import InvalidPhoneNumber
from agent.optout import OptOutRecord, call_event_id, utcnow
from agent.phone import normalise

CHANNEL_VARS = ("CALL_ID", "CAMPAIGN_ID", "CONTACT_ID", "OPTOUT_NUMBER")
REQUEST_URI = "CHANNEL(pjsip,request_uri)"
REMOTE_URI = "CHANNEL(pjsip,remote_uri)"
DIALLED_SOURCE = "dialled (CHANNEL(pjsip,remote_uri) of an outbound channel)"
_URI_USER = re.compile(r"^\s*<?\s*(?:sips?|tel):([^@;>\s]+)", re.IGNORECASE)


def parse_ari_time(value: object) -> datetime | None:
    """An ARI or Asterisk timestamp (`2026-11-25T12:25:11.945+0000`, with or without the fraction, `Z` or
    `+00:00`); None when it cannot be read (callers then use their receive time)."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    text = value.strip().replace("Z", "+00:00")
    if len(text) > 5 and text[-5] in "+-" and text[-4:].isdigit():
        text = f"{text[:-2]}:{text[-2:]}"  # +0000 -> +00:00
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True)
class ChannelFacts:
    """A channel as any Asterisk interface describes it."""

    uniqueid: str
    name: str = ""
    linkedid: str | None = None
    variables: dict[str, str] = field(default_factory=dict)
    connected_number: str | None = None
    caller_number: str | None = None
    exten: str | None = None
    context: str | None = None
    dialled: str | None = None
    """The number Asterisk dialled on this channel, when it is an outbound PJSIP channel (`dialled_number`)."""

    def var(self, name: str) -> str | None:
        value = self.variables.get(name)
        return value.strip() or None if value else None


def known(value: object) -> str | None:
    """A caller ID or extension as Asterisk reports it, None for its spellings of "none"."""
    return None if not value or value in ("<unknown>", "unknown") else str(value)


def uri_user(uri: str | None) -> str | None:
    """The user part of a `sip:`/`sips:`/`tel:` URI (`<sip:+15550100001@host>;tag=x` -> `+15550100001`)."""
    match = _URI_USER.match(uri or "")
    return match.group(1) if match else None


def dialled_number(request_uri: str | None, remote_uri: str | None) -> str | None:
    """The callee's number from a PJSIP channel's `request_uri` and `remote_uri` (None: not proven).

    Only an outbound channel qualifies: `request_uri` read as an empty string (None means it could not be
    read at all, e.g. not a PJSIP channel); on an inbound channel `remote_uri` is the caller.
    """
    if request_uri != "" or not remote_uri:
        return None
    return uri_user(remote_uri)


@dataclass(frozen=True)
class NumberChoice:
    number: str | None
    """E.164, or None when no source proves a number."""
    source: str | None
    raw: str | None
    """The first raw candidate seen when none was valid (for the audit row)."""


def derive_number(facts: ChannelFacts, *, region: str) -> NumberChoice:
    """The callee's number by the precedence in the module docstring."""
    first_raw = None
    for source, raw in (("OPTOUT_NUMBER", facts.var("OPTOUT_NUMBER")), (DIALLED_SOURCE, facts.dialled)):
        if not raw:
            continue
        first_raw = first_raw or raw
        try:
            return NumberChoice(normalise(raw, region=region, field=source), source, None)
        except InvalidPhoneNumber:
            continue
    return NumberChoice(None, None, first_raw)


def call_record(
    facts: ChannelFacts, *, origin: Origin, digit: str, pressed_at: datetime | None, region: str,
    received_at: datetime | None = None,
) -> OptOutRecord:
    """The opt-out record of a press on `facts`' channel (number-unknown when no number is proven)."""
    choice = derive_number(facts, region=region)
    return OptOutRecord(
        event_id=call_event_id(facts.uniqueid, choice.number),
        phone_number=choice.number,
        number_source=choice.source,
        raw_number=choice.raw,
        call_id=facts.var("CALL_ID") or facts.linkedid or facts.uniqueid,
        campaign_id=facts.var("CAMPAIGN_ID"),
        contact_id=facts.var("CONTACT_ID"),
        origin=origin,
        digit=digit,
        pressed_at=pressed_at,
        received_at=received_at or utcnow(),
        channel=None if choice.number else {
            "uniqueid": facts.uniqueid, "name": facts.name, "linkedid": facts.linkedid,
            "context": facts.context, "exten": facts.exten, "callerNumber": facts.caller_number,
            "connectedNumber": facts.connected_number, "variables": facts.variables,
        },
    )
