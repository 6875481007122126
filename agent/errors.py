"""Errors of the agent package.

    OptOutError
     +-- InvalidInput            bad input; names the field and the problem (never retried)
     |    +-- InvalidPhoneNumber
     +-- StoreUnavailable        the system of record cannot be reached (retried, the journal holds the opt-out)
     |    +-- SchemaMissing      the store answers but has no opt-out schema (wrong database or file)
     +-- StoreRejected           the store refused this data (not a connectivity failure: retried record by
     |                           record, then parked)
     +-- CacheUnavailable        Redis cannot be reached (non-critical; the store answers instead)
     +-- JournalError            the local durable journal failed (critical: the store is written directly)
     +-- TelephonyError          Asterisk (ARI/AMI/AGI) refused or could not be reached
     |    +-- AgiProtocolError   a FastAGI peer broke the protocol (garbage, no script, closed, too slow)
     +-- PublishUnavailable      SNS refused or could not be reached (the outbox keeps the opt-out)
     +-- ConfigError             settings that cannot work together

Library errors become these at the boundary (`raise StoreUnavailable(...) from exc`).
"""

from __future__ import annotations

from botocore.exceptions import BotoCoreError, ClientError

AWS_ERRORS = (BotoCoreError, ClientError, OSError, TimeoutError)
"""What an aiobotocore call raises when AWS refuses or is unreachable (SNS publisher, SQS poller catch it)."""


class OptOutError(Exception):
    """Base of every error this package raises on purpose."""


class InvalidInput(OptOutError):
    """Input that can never be accepted; `field` names where the problem is."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"field {field}: {problem}")
        self.field = field
        self.problem = problem

    def __reduce__(self) -> tuple[type[InvalidInput], tuple[str, str]]:
        return type(self), (self.field, self.problem)  # so it crosses into worker processes


class InvalidPhoneNumber(InvalidInput):
    """A phone number that is not a valid number (for the default region, when written nationally)."""


class StoreUnavailable(OptOutError):
    """The store (PostgreSQL or SQLite) failed; the opt-out stays journaled and is retried."""


class SchemaMissing(StoreUnavailable):
    """The store has no opt-out schema: not migrated, or not the database the agent uses."""


class StoreRejected(OptOutError):
    """The store refused the data itself (a constraint, a value it cannot hold): retrying the same batch
    cannot help, so the pipeline retries record by record and parks what keeps failing."""


class CacheUnavailable(OptOutError):
    """Redis failed; callers fall back to the store."""


class JournalError(OptOutError):
    """The durable journal could not record the opt-out."""


class TelephonyError(OptOutError):
    """Asterisk refused a request or could not be reached."""


class AgiProtocolError(TelephonyError):
    """The peer broke the FastAGI protocol: garbage, no script, closed mid-command, or too slow."""


class PublishUnavailable(OptOutError):
    """SNS refused or could not be reached; the records stay in the outbox and are retried."""


class ConfigError(OptOutError):
    """The configuration cannot work."""
