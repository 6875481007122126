"""Wire constants: Redis keys, table names, origins. Every name the dialers or the database see lives here."""

from __future__ import annotations

from enum import StrEnum

# --- Redis keys read by the dialers' pre-dial check -------------------------------------------------
BLACKLIST_SET = "blacklist:numbers"
"""Set of every blacklisted E.164 number (permanent)."""
BLACKLIST_SYNCED = "blacklist:synced"
"""Marker written by reconciliation once the set holds the whole store; absent after Redis starts empty."""
ACTION_TTL_SECONDS = 24 * 3600


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
TABLE_BLACKLIST = "blacklist"
TABLE_ACTIONS = "optout_actions"
TABLE_CAMPAIGNS = "campaign_optouts"
TABLE_SCHEMA_VERSION = "optout_schema_version"


class Origin(StrEnum):
    """Where an opt-out came from."""

    ARI = "ari"
    AGI = "agi"
    AMI = "ami"
    SNS = "sns"
    ADMIN = "admin"


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
    """The number was on the blacklist already; the action is still recorded."""
    NUMBER_UNKNOWN = "number_unknown"
    """The caller pressed the digit but no valid number could be derived; the call was still ended."""
    REMOVED = "removed"
    """An administrator removed the number (with a reason)."""


DEFAULT_OPTOUT_DIGIT = "9"
SNS_ORIGIN_ATTRIBUTE = "optout-agent"
