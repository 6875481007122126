"""Errors of the agent package.

    OptOutError
     +-- InvalidInput            bad input; names the field and the problem (never retried)
     |    +-- InvalidPhoneNumber
     +-- StoreUnavailable        the system of record cannot be reached or refused the write (retried)
     +-- CacheUnavailable        Redis cannot be reached (non-critical; the store answers instead)
     +-- JournalError            the local durable journal failed (critical: the opt-out cannot be accepted)
     +-- TelephonyError          Asterisk (ARI/AMI/AGI) refused or could not be reached
     +-- ConfigError             settings that cannot work together

Library errors become these at the boundary (`raise StoreUnavailable(...) from exc`).
"""

from __future__ import annotations


class OptOutError(Exception):
    """Base of every error this package raises on purpose."""


class InvalidInput(OptOutError):
    """Input that can never be accepted; `field` names where the problem is."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"field {field}: {problem}")
        self.field = field
        self.problem = problem


class InvalidPhoneNumber(InvalidInput):
    """A phone number that is not a valid number (for the default region, when written nationally)."""


class StoreUnavailable(OptOutError):
    """The store (PostgreSQL or SQLite) failed; the opt-out stays journaled and is retried."""


class CacheUnavailable(OptOutError):
    """Redis failed; callers fall back to the store."""


class JournalError(OptOutError):
    """The durable journal could not record the opt-out."""


class TelephonyError(OptOutError):
    """Asterisk refused a request or could not be reached."""


class ConfigError(OptOutError):
    """The configuration cannot work."""
