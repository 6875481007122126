"""Runs last: everything the suite logged (through the agent's formatter) holds no full phone number and
no secret. Subprocess agents log to their own stderr; the CLI tests check theirs separately."""

from __future__ import annotations

import os
import re

from tests.conftest import SUITE_LOG

E164 = re.compile(r"\+\d{8,15}")
NATIONAL = re.compile(r"(?<![\w-])0\d{2}-?\d{3}-?\d{4}(?![\w-])")  # not inside ids or hashes


def test_suite_logs_hold_no_full_phone_number_and_no_secret() -> None:
    text = SUITE_LOG.read_text(encoding="utf-8")
    assert text, "nothing was logged: the scan would prove nothing"
    assert not E164.findall(text)
    assert not NATIONAL.findall(text)
    for name in ("ARI_PASSWORD", "AMI_SECRET", "AGENT_API_TOKEN"):
        secret = os.environ.get(name)
        if secret:
            assert secret not in text, f"{name} appears in the logs"


def test_masking_would_catch_a_leak() -> None:
    """The scan above is only worth something if a leaked number would have matched it."""
    import logging

    from agent.logs import JsonFormatter

    record = logging.makeLogRecord({"msg": "opt-out for %s", "args": ("+972501234567",), "levelname": "INFO"})
    assert E164.findall(JsonFormatter(full_numbers=True).format(record))
    assert not E164.findall(JsonFormatter(full_numbers=False).format(record))
