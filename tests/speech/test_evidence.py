"""The utterance on the audit row: stored, hashed when set, and older rows still verify."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent import audit
from agent.audit import ChainVerifier
from agent.constants import Origin, Outcome
from agent.optout import OptOutRecord, SpeechEvidence
from agent.store import action_row
from agent.store_sqlite import SqliteStore


def spoken(number: str = "+15551230001") -> OptOutRecord:
    return OptOutRecord(event_id=f"e-{number}", phone_number=number, origin=Origin.SPEECH,
                        received_at=datetime.now(UTC),
                        speech=SpeechEvidence(transcript="Stop calling me.", score=0.93, phrase="stop calling me",
                                              audio_sha256="ab" * 32))


def test_rows_without_speech_hash_as_they_did_before_the_columns_existed() -> None:
    row = action_row(OptOutRecord(event_id="e1", phone_number="+15551230000", origin=Origin.ARI, digit="9",
                                  received_at=datetime.now(UTC)), Outcome.BLACKLISTED, datetime.now(UTC))
    import json
    before = json.dumps([audit._norm(c, row.get(c)) for c in audit.HASHED_COLUMNS], separators=(",", ":"),
                        ensure_ascii=False).encode()
    assert audit.canonical(row) == before


def test_the_transcript_is_covered_by_the_chain() -> None:
    row = action_row(spoken(), Outcome.BLACKLISTED, datetime.now(UTC))
    assert row["speech_score"] == "0.930"
    audit.chain([row], None)
    row_changed = {**row, "speech_transcript": "Call me any time."}
    verifier = ChainVerifier()
    assert verifier.feed({"id": 1, **row})
    verifier = ChainVerifier()
    assert not verifier.feed({"id": 1, **row_changed})


async def test_sqlite_store_keeps_speech_rows_next_to_older_ones_and_the_chain_verifies(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "s.db") as store:
        await store.migrate()
        older = OptOutRecord(event_id="e-old", phone_number="+15551230009", origin=Origin.ARI, digit="9",
                             received_at=datetime.now(UTC))
        await store.write([older])
        await store.write([spoken()])
        [row] = await store.history("+15551230001")
        assert row.origin == "speech" and row.speech_transcript == "Stop calling me."
        assert row.speech_phrase == "stop calling me" and row.speech_audio_sha256 == "ab" * 32
        verifier = ChainVerifier()
        async for r in store.chain_rows():
            assert verifier.feed(r.columns())
        assert verifier.report().rows == 2


def test_evidence_refuses_a_malformed_audio_hash() -> None:
    with pytest.raises(ValueError, match=r"audioSha256|audio_sha256"):
        SpeechEvidence(transcript="x", score=1.0, audio_sha256="not-a-hash")
