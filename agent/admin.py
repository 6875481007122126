"""Administrative commands behind the CLI: add, remove, a number's history, the audit chain. Bulk import
and export are agent/bulk.py."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from agent.audit import ChainReport, ChainVerifier
from agent.constants import Origin, Source
from agent.core import Core
from agent.errors import InvalidInput, OptOutError
from agent.optout import OptOutRecord
from agent.phone import normalise
from agent.pipeline import PipelineResult
from agent.store import ActionRow, Removal, RemoveResult


async def add(core: Core, number: str, *, source: Source, reason: str | None, actor: str) -> PipelineResult:
    """Blacklist one number through the pipeline (journaled, audited with origin admin)."""
    e164 = normalise(number, region=core.settings.optout_default_region, field="NUMBER")
    record = OptOutRecord(
        event_id=f"admin-{uuid.uuid4()}",
        phone_number=e164,
        number_source="NUMBER",
        origin=Origin.ADMIN,
        source=source,
        reason=reason or f"added by {actor}",
        received_at=datetime.now(UTC),
        actor=actor,
    )
    return await core.pipeline.submit(record)


async def remove(core: Core, number: str, *, reason: str, actor: str) -> tuple[RemoveResult, str | None]:
    """Take a number off the blacklist; the removal is an audited action, ordered by the store: an opt-out
    of the number stored after this call began wins (OPTED_OUT_SINCE). Returns what the store did and a
    note when the dialers' view does not show it yet."""
    if not reason.strip():
        raise InvalidInput("--reason", "a removal needs a reason (it is written to the audit trail)")
    e164 = normalise(number, region=core.settings.optout_default_region, field="NUMBER")
    seen = await core.store.head()
    removal = Removal(e164, reason.strip(), actor, f"remove-{uuid.uuid4()}", datetime.now(UTC), seen_seq=seen)
    result = await core.store.remove(removal)
    note = None
    if result is RemoveResult.REMOVED and core.keeper is not None and core.cache is not None:
        try:
            if not await core.keeper.settle(await core.store.head(), within=5.0):
                note = "the Redis view is not proven current yet; a keeper applies the removal within a few rounds"
            elif e164 in (await core.cache.view()).pending.values():
                note = ("an opt-out of this number that the store does not have yet is pending in Redis: it stays "
                        "listed, and is listed again once stored")
        except OptOutError as exc:
            note = f"Redis not updated now ({exc}); a keeper applies the removal from the store"
    return result, note


def format_timeline(row: ActionRow, shown_number: str) -> str:
    """One action as a readable timeline: its moments (press, journal, hangup, visibility, store) in time order,
    relative to the first."""
    asterisk = row.origin in ("ari", "ami")
    steps = [
        ("pressed (Asterisk's clock)" if asterisk else "pressed", row.pressed_at),
        ("received by the agent", row.received_at),
        ("journaled", row.journaled_at),
        (f"hangup requested ({row.hangup_method}: {row.hangup_result})", row.hangup_requested_at),
        ("hung up (Asterisk's clock)" if asterisk else "hung up", row.hungup_at),
        ("visible to the dialers (Redis confirmed)", row.visible_at),
        ("visible to the dialers (cache sync applied it)", row.cache_visible_at),
        ("stored", row.recorded_at),
    ]
    moments = sorted(((label, when) for label, when in steps if when is not None), key=lambda m: m[1])
    lines = [f"{row.outcome} {shown_number} via {row.origin} call {row.call_id or '-'}"
             f" campaign {row.campaign_id or '-'} event {row.event_id}"]
    if row.actor or row.reason:
        lines.append(f"    by {row.actor or '-'}: {row.reason or ''}")
    if moments:
        start = moments[0][1]
        for label, when in moments:
            offset = (when - start).total_seconds() * 1000
            lines.append(f"    {when.astimezone(UTC).isoformat(timespec='milliseconds')}  +{offset:9.1f} ms  {label}")
    return "\n".join(lines)


async def verify_chain(core: Core, *, expected_head: str | None = None) -> ChainReport:
    """Walk the whole audit chain (see agent/audit.py)."""
    verifier = ChainVerifier(expected_head=expected_head)
    async for row in core.store.chain_rows():
        if not verifier.feed(row.columns()):
            break
    return verifier.report()
