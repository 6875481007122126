"""The keeper writes one entry per store change (millions for an import) without pydantic: its JSON must be
exactly what `BlacklistEntry.to_json` writes, which is what dialers read from `blacklist:{phone}`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.optout import BlacklistEntry, entry_json


@settings(max_examples=1500)
@given(phone=st.text(min_size=1), at=st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=2))])),
       reason=st.text(), source=st.sampled_from(["user_optout", "admin_import", "compliance"]),
       metadata=st.none() | st.dictionaries(st.sampled_from(["callId", "campaignId", "timestamp"]), st.text()))
def test_the_fast_entry_is_the_entry_dialers_read(phone: str, at: datetime, reason: str, source: str,
                                                  metadata: dict[str, Any] | None) -> None:
    try:
        want = BlacklistEntry(phone_number=phone, added_at=at, reason=reason, source=source, metadata=metadata)
    except ValueError:
        return
    assert entry_json(phone, at, reason, source, metadata) == want.to_json()


def test_values_that_are_no_entry_are_left_to_the_caller() -> None:
    at = datetime.now(UTC)
    assert entry_json("+15550100", at, "x", "not-a-source", None) is None
    assert entry_json("+15550100", at.replace(tzinfo=None), "x", "user_optout", None) is None
