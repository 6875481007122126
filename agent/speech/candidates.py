"""Speech mode `flag`: an utterance that seemed an opt-out is recorded and published for review; nothing is
hung up and no number is listed.

The record is an audit row (outcome `speech_candidate`, origin `speech`, the transcript, score, phrase and
audio SHA-256), appended to the same hash chain as every action; it is no blacklist change, so the Redis
keeper ignores it. The `speech_optout_candidate` event goes to the SNS topic after the row is stored,
best effort (the row is the durable record: the compliance report lists it).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from agent.constants import EVENT_TYPE_SPEECH_CANDIDATE, Origin, Outcome
from agent.errors import StoreRejected, StoreUnavailable
from agent.optout import SpeechEvidence, iso_z
from agent.store import Store, admin_row
from agent.telephony import ChannelFacts, call_record

log = logging.getLogger("agent.speech.candidates")

Publish = Callable[[dict[str, Any], str], Awaitable[bool]]
"""(message, eventType) -> whether SNS took it."""
CANDIDATE_REASON = "callee may have asked not to be called (spoken; for review, nothing applied)"


class CandidateRecorder:
    """Writes candidates to the store (retrying while it is down, within `store_attempts`) and publishes them."""

    def __init__(self, *, store: Store, region: str, publish: Publish | None = None, store_attempts: int = 5) -> None:
        self._store = store
        self._region = region
        self._publish = publish
        self._attempts = store_attempts

    async def record(self, facts: ChannelFacts, evidence: SpeechEvidence, *, spoken_at: datetime) -> str | None:
        """Record one candidate; its event id, or None when the store did not take it (logged at ERROR)."""
        base = call_record(facts, origin=Origin.SPEECH, digit="", pressed_at=spoken_at, region=self._region)
        event_id = "speech-" + hashlib.sha256(f"{facts.uniqueid}\x1f{evidence.audio_sha256}".encode()).hexdigest()[:32]
        columns: dict[str, Any] = evidence.columns()
        row = admin_row(event_id=event_id, phone_number=base.phone_number, outcome=Outcome.SPEECH_CANDIDATE,
                        at=spoken_at, recorded_at=datetime.now(UTC), actor=None, reason=CANDIDATE_REASON,
                        origin=Origin.SPEECH.value, number_source=base.number_source, raw_number=base.raw_number,
                        call_id=base.call_id, campaign_id=base.campaign_id, contact_id=base.contact_id,
                        pressed_at=spoken_at, channel=base.channel, **columns)
        for attempt in range(self._attempts):
            try:
                await self._store.append_action(row)
                break
            except StoreUnavailable as exc:
                if attempt + 1 == self._attempts:
                    log.error("speech candidate %s not recorded: the store is unavailable (%s)", event_id, exc)
                    return None
                await asyncio.sleep(min(5.0, 0.5 * 2**attempt))
            except StoreRejected as exc:
                log.error("speech candidate %s refused by the store: %s", event_id, exc)
                return None
        if self._publish is not None:
            message = {"eventId": event_id, "origin": Origin.SPEECH.value, "callId": base.call_id,
                       "campaignId": base.campaign_id, "contactId": base.contact_id,
                       "phoneNumber": base.phone_number, "timestamp": iso_z(spoken_at),
                       "transcript": evidence.transcript, "score": evidence.score, "phrase": evidence.phrase,
                       "audioSha256": evidence.audio_sha256}
            if not await self._publish({k: v for k, v in message.items() if v is not None},
                                       EVENT_TYPE_SPEECH_CANDIDATE):
                log.warning("speech candidate %s recorded but not published", event_id)
        return event_id
