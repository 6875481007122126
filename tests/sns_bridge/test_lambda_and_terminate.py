"""The Lambda handler with the event shape Lambda sends for an SNS trigger, and the worker hangup call."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from conftest import EVENT, WorkerServer, event_json

from agent.constants import BLACKLIST_SET
from agent.store_postgres import PostgresStore
from sns_bridge.errors import NotStored
from sns_bridge.hangup import WorkerHangup
from sns_bridge.lambda_handler import handler

E164 = EVENT["phoneNumber"]


def lambda_event(*messages: str, attributes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The event Lambda builds for an SNS trigger (note SigningCertUrl and UnsubscribeUrl)."""
    return {"Records": [
        {
            "EventSource": "aws:sns",
            "EventVersion": "1.0",
            "EventSubscriptionArn": "arn:aws:sns:us-east-1:123456789012:optout-events:2bcfbf39",
            "Sns": {
                "Type": "Notification",
                "MessageId": f"95df01b4-ee98-5cb9-9903-4c221d41eb5{i}",
                "TopicArn": "arn:aws:sns:us-east-1:123456789012:optout-events",
                "Subject": None,
                "Message": message,
                "Timestamp": "2026-11-25T12:00:00.000Z",
                "SignatureVersion": "1",
                "Signature": "dGVzdA==",
                "SigningCertUrl": "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem",
                "UnsubscribeUrl": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe",
                "MessageAttributes": attributes or {},
            },
        }
        for i, message in enumerate(messages)
    ]}


@pytest.fixture
def lambda_env(monkeypatch: pytest.MonkeyPatch, pg_store: PostgresStore, pg_dsn: str, redis_url: str,
               tmp_path: Path) -> None:
    monkeypatch.setenv("DATABASE_URL", pg_dsn)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("OPTOUT_JOURNAL_PATH", str(tmp_path / "lambda-journal.db"))
    monkeypatch.delenv("ASTERISK_WORKER_URL", raising=False)
    monkeypatch.delenv("BRIDGE_TOPIC_ARNS", raising=False)


async def test_lambda_applies_the_old_event_shape(
    lambda_env: None, pg_store: PostgresStore, redis_sync: redis.Redis,
) -> None:
    exact = {"Records": [{"Sns": {"Message": event_json()}}]}

    summary = await asyncio.to_thread(handler, exact, None)

    assert summary["applied"] == 1 and summary["rejected"] == []
    assert redis_sync.sismember(BLACKLIST_SET, E164)
    [row] = await pg_store.history(E164)
    assert row.origin == "sns"


async def test_lambda_summary_counts_duplicates_skips_and_rejects(
    lambda_env: None, pg_store: PostgresStore,
) -> None:
    event = lambda_event(event_json(), event_json(), event_json(phoneNumber="12"),
                         event_json(eventId="call-x", origin="ami"))

    summary = await asyncio.to_thread(handler, event, None)

    assert summary["records"] == 4
    assert (summary["applied"], summary["duplicate"], summary["skipped"]) == (1, 1, 1)
    [rejected] = summary["rejected"]
    assert rejected["record"] == 2 and "phoneNumber" in rejected["error"]
    assert len(await pg_store.history(E164)) == 1


async def test_lambda_raises_when_the_store_is_down_so_lambda_retries(
    lambda_env: None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:1/x?connect_timeout=1")

    with pytest.raises(NotStored):
        await asyncio.to_thread(handler, lambda_event(event_json()), None)


async def test_a_retry_after_a_cold_start_stores_what_the_first_attempt_only_journaled(
    lambda_env: None, monkeypatch: pytest.MonkeyPatch, pg_store: PostgresStore, pg_dsn: str, tmp_path: Path,
) -> None:
    """The first attempt's journal was in a /tmp that is gone; the same MessageId must still be applied."""
    event = lambda_event(event_json())
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:1/x?connect_timeout=1")
    with pytest.raises(NotStored):
        await asyncio.to_thread(handler, event, None)

    monkeypatch.setenv("DATABASE_URL", pg_dsn)
    monkeypatch.setenv("OPTOUT_JOURNAL_PATH", str(tmp_path / "another-container.db"))
    summary = await asyncio.to_thread(handler, event, None)

    assert summary["applied"] == 1, summary
    assert await pg_store.blacklisted([E164]) == {E164}


# --- hanging up through the worker ------------------------------------------------------------


async def test_hangup_posts_to_the_worker_with_the_bearer_token(worker: WorkerServer) -> None:
    async with httpx.AsyncClient() as client:
        info = await WorkerHangup(base_url=worker.url + "/", token="s3cret", client=client).hang_up("call/1")

    assert info.result == "ok" and info.method == "worker-api"
    assert worker.requests == [("/calls/call%2F1/hangup", "Bearer s3cret")]


async def test_hangup_reports_unknown_call(worker: WorkerServer) -> None:
    worker.status = 404
    async with httpx.AsyncClient() as client:
        info = await WorkerHangup(base_url=worker.url, token=None, client=client).hang_up("call-1")

    assert info.result == "not-found"
    assert worker.requests == [("/calls/call-1/hangup", None)]


async def test_unreachable_worker_is_reported_not_raised() -> None:
    async with httpx.AsyncClient() as client:
        info = await WorkerHangup(base_url="http://127.0.0.1:1", token="t", client=client).hang_up("call-1")

    assert info.result is not None and info.result.startswith("error:")


async def test_lambda_refuses_a_record_without_topic_arn_when_an_allow_list_is_set(
    lambda_env: None, monkeypatch: pytest.MonkeyPatch, pg_store: PostgresStore,
) -> None:
    monkeypatch.setenv("BRIDGE_TOPIC_ARNS", "arn:aws:sns:us-east-1:123456789012:optout-events")
    event = lambda_event(event_json())
    del event["Records"][0]["Sns"]["TopicArn"]
    summary = await asyncio.to_thread(handler, event, None)
    assert summary["applied"] == 0 and "no TopicArn" in summary["rejected"][0]["error"]
    assert await pg_store.blacklisted([E164]) == set()
