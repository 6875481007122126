"""What every telephony path (ARI, AGI, AMI) shares: a channel's facts -> the opt-out record. No I/O.

Number precedence (the called number, the one that opts out), first valid wins:
  1. the channel variable OPTOUT_NUMBER (set by the dialer on each call)
  2. the connected line number (on a dialer's outbound leg, the remote party)
  3. the dialled extension, when it is a possible phone number
Where none is valid, the record is a number-unknown opt-out carrying the channel's data: the call is
still ended and the press is still audited.

One call makes one opt-out: the event id comes from the channel's uniqueid, which ARI (channel id),
AMI (Uniqueid) and AGI (agi_uniqueid) all report, so two paths seeing the same press agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from agent.constants import Origin
from agent.errors import InvalidPhoneNumber
from agent.optout import OptOutRecord, call_event_id, utcnow
from agent.phone import normalise

CHANNEL_VARS = ("CALL_ID", "CAMPAIGN_ID", "CONTACT_ID", "OPTOUT_NUMBER")


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

    def var(self, name: str) -> str | None:
        value = self.variables.get(name)
        return value.strip() or None if value else None


def derive_number(facts: ChannelFacts, *, region: str) -> tuple[str | None, str | None]:
    """(E.164 number or None, the raw value it came from or the first raw candidate seen)."""
    candidates = [facts.var("OPTOUT_NUMBER"), facts.connected_number, facts.exten]
    first_raw = None
    for raw in candidates:
        if not raw or raw in ("s", "<unknown>"):
            continue
        first_raw = first_raw or raw
        try:
            return normalise(raw, region=region, field="OPTOUT_NUMBER"), raw
        except InvalidPhoneNumber:
            continue
    return None, first_raw


def call_record(
    facts: ChannelFacts, *, origin: Origin, digit: str, pressed_at: datetime | None, region: str,
    received_at: datetime | None = None,
) -> OptOutRecord:
    """The opt-out record of a press on `facts`' channel (number-unknown when none can be derived)."""
    number, raw = derive_number(facts, region=region)
    return OptOutRecord(
        event_id=call_event_id(facts.uniqueid),
        phone_number=number,
        raw_number=raw if number is None else None,
        call_id=facts.var("CALL_ID") or facts.linkedid or facts.uniqueid,
        campaign_id=facts.var("CAMPAIGN_ID"),
        contact_id=facts.var("CONTACT_ID"),
        origin=origin,
        digit=digit,
        pressed_at=pressed_at,
        received_at=received_at or utcnow(),
        channel=None if number else {
            "uniqueid": facts.uniqueid, "name": facts.name, "linkedid": facts.linkedid,
            "context": facts.context, "exten": facts.exten, "callerNumber": facts.caller_number,
            "connectedNumber": facts.connected_number, "variables": facts.variables,
        },
    )
