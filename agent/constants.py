"""Wire constants: Redis keys, table names, origins. Every name the dialers or the database see lives here."""

from __future__ import annotations

from enum import StrEnum

# --- Redis: the dialers' view of the blacklist (agent/cache.py draws the whole model) --------------------
BLACKLIST_SET = "blacklist:numbers"
"""Set of every blacklisted E.164 number the view holds (store changes plus unstored opt-outs)."""
BLACKLIST_SENTINEL = "~sentinel"
"""A member only a keeper's rebuild puts in the set: a set without it (missing, or re-created by a writer's
SADD since) was lost."""
BLACKLIST_LEASE = "blacklist:synced"
"""The currency lease (value `"{seq} {lineage}"`, expires by itself): present only while the keeper has proven,
within the lease time, that the set holds every change of the store up to `seq`. (The key keeps its first
name: dialers that read Redis directly test `EXISTS blacklist:synced`.)"""
BLACKLIST_VIEW = "blacklist:view"
"""Hash: `seq` and `lineage` (the store change the set holds up to, and that row's chain hash), and one field
`p:{eventId}` -> number per opt-out some writer holds that the store may not have yet."""
BLACKLIST_NEXT = "blacklist:numbers:next"
"""The keeper's rebuild copies the store here, then swaps it in for the set in one script."""
BLACKLIST_KEEPER = "blacklist:keeper"
"""The keeper lock (redis-py `Lock`: a token with an expiry the keeper extends)."""
PENDING_FIELD_PREFIX = "p:"
ACTION_TTL_SECONDS = 24 * 3600


def sns_message_key(message_id: str) -> str:
    """`sns_message:{MessageId}`: an SNS message the bridge has applied (kept SNS_MESSAGE_TTL_SECONDS)."""
    return f"sns_message:{message_id}"


SNS_MESSAGE_TTL_SECONDS = 24 * 3600


def blacklist_entry_key(phone_number: str) -> str:
    """`blacklist:{phoneNumber}`: the entry as JSON (permanent)."""
    return f"blacklist:{phone_number}"


def action_key(action_id: str) -> str:
    """`optout_action:{actionId}`: the action record, kept 24 h."""
    return f"optout_action:{action_id}"


def campaign_counter_key(campaign_id: str) -> str:
    """`campaign:{campaignId}:optouts`: opt-outs counted per campaign."""
    return f"campaign:{campaign_id}:optouts"


# --- Database ------------------------------------------------------------------------------------------
TABLE_SCHEMA_VERSION = "optout_schema_version"
TABLE_IMPORTS = "optout_imports"
"""How far each bulk import file (by SHA-256) was committed: a re-run resumes there."""
CHANGE_NOTIFY_CHANNEL = "optout_changes"
"""PostgreSQL NOTIFY channel: a statement trigger on the audit trail notifies it at every commit (the keepers'
push)."""
CHAIN_LOCK = 0x0F7_0A8
"""pg_advisory_xact_lock key every writer of the audit trail takes: one chain, appended in commit order."""


class Origin(StrEnum):
    """Where an opt-out came from."""

    ARI = "ari"
    AGI = "agi"
    AMI = "ami"
    SNS = "sns"
    ADMIN = "admin"
    SPEECH = "speech"
    """The callee said it (agent/speech): an utterance the matcher took as an opt-out, in mode `act`."""


class Source(StrEnum):
    """Why a number is on the blacklist (the dialers' `source` field)."""

    USER_OPTOUT = "user_optout"
    ADMIN_IMPORT = "admin_import"
    COMPLIANCE = "compliance"


class Outcome(StrEnum):
    """What an action did, as written in the audit trail."""

    BLACKLISTED = "blacklisted"
    """The number was added to the blacklist by this action."""
    ALREADY_BLACKLISTED = "already_blacklisted"
    """The number was on the blacklist already; the action is still audited."""
    NUMBER_UNKNOWN = "number_unknown"
    """The caller pressed the digit but no valid number could be derived; the call was still ended."""
    REMOVED = "removed"
    """An administrator removed the number (with a reason)."""
    PREVENTED = "prevented"
    """A call to a blacklisted number was stopped before it was placed (dial guard or FastAGI precheck)."""
    SPEECH_CANDIDATE = "speech_candidate"
    """Speech mode `flag`: the callee seemed to ask for an opt-out; recorded for review, nothing blacklisted."""


CHANGE_OUTCOMES = (Outcome.BLACKLISTED, Outcome.ALREADY_BLACKLISTED, Outcome.REMOVED)
"""Audit outcomes that are changes of the blacklist (the change feed the cache follows)."""


DEFAULT_OPTOUT_DIGIT = "9"
SNS_ORIGIN_ATTRIBUTE = "optout-agent"
EVENT_TYPE_OPTOUT = "optout"
"""SNS `eventType` of an opt-out: the producers' schema, with an E.164 phoneNumber."""
EVENT_TYPE_NUMBER_UNKNOWN = "optout_number_unknown"
"""SNS `eventType` of a press on a call whose number could not be proven: no phoneNumber, the call's ids."""
EVENT_TYPE_SPEECH_CANDIDATE = "speech_optout_candidate"
"""SNS `eventType` of an utterance that seemed an opt-out, in speech mode `flag` (for review; nothing applied)."""
SPEECH_ID_PREFIX = "optout-speech-"
"""Every ARI channel and bridge the speech listener creates has an id starting with this (so a sweep after a
restart finds the ones a previous run left)."""
