"""POST /sns: signed messages (our own key and certificate, served locally), through the real pipeline
(PostgreSQL + Redis). Forged or invalid input is refused with 4xx and writes nothing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
import redis
from conftest import EVENT, MAX_BODY, Endpoint, WorkerServer, event_json, open_endpoint
from signing import (
    CERT_PATH,
    OTHER_TOPIC_ARN,
    REGION,
    TOPIC_ARN,
    CertServer,
    SigningIdentity,
    ToLocalServer,
    confirmation,
    notification,
    sign,
)

from agent.cache import RedisCache
from agent.constants import BLACKLIST_SET
from agent.journal import Journal
from agent.pipeline import OptOutPipeline
from agent.store_postgres import PostgresStore
from sns_bridge.handler import BridgeHandler, MessageIdDedupe

E164 = EVENT["phoneNumber"]


def signed_optout(identity: SigningIdentity, **overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"Message": event_json(), "MessageAttributes": {}}
    fields.update(overrides)
    return sign(notification(**fields), identity)


# --- accepted ------------------------------------------------------------------------------------


async def test_valid_notification_is_blacklisted_and_answers_200(
    endpoint: Endpoint, identity: SigningIdentity, written: Callable[[], Any], redis_sync: redis.Redis,
    pg_store: PostgresStore,
) -> None:
    response = await endpoint.post(signed_optout(identity))

    assert response.status_code == 200, response.text
    assert response.json()["status"] == "stored"
    assert redis_sync.sismember(BLACKLIST_SET, E164)
    assert await pg_store.blacklisted([E164]) == {E164}
    [row] = await pg_store.history(E164)
    assert row.origin == "sns"
    assert written().actions == 1


async def test_duplicate_notification_answers_200_and_writes_one_audit_row(
    endpoint: Endpoint, identity: SigningIdentity, written: Callable[[], Any],
) -> None:
    first = await endpoint.post(signed_optout(identity))
    again = await endpoint.post(signed_optout(identity))  # SNS redelivery: same MessageId
    other_id = await endpoint.post(signed_optout(identity, MessageId="7a1c0c6e-0000-4000-8000-000000000001"))

    assert [r.status_code for r in (first, again, other_id)] == [200, 200, 200]
    assert again.json()["result"] == "duplicate"
    assert other_id.json()["result"] == "duplicate"  # same event, new MessageId: the eventId catches it
    assert written().actions == 1


async def test_agents_own_event_is_skipped_by_its_signed_body(
    endpoint: Endpoint, identity: SigningIdentity, written: Callable[[], Any],
) -> None:
    by_body = signed_optout(identity, MessageId="7a1c0c6e-0000-4000-8000-000000000002",
                            Message=event_json(eventId="call-abc", origin="ari"))
    response = await endpoint.post(by_body)
    assert response.status_code == 200
    assert response.json()["result"] == "skipped"
    assert written().actions == 0
    assert written().redis_keys == 0


async def test_an_origin_attribute_alone_skips_nothing_attributes_are_not_signed(
    endpoint: Endpoint, identity: SigningIdentity, pg_store: PostgresStore,
) -> None:
    forged = signed_optout(identity, MessageAttributes={"origin": {"Type": "String", "Value": "optout-agent"}})
    response = await endpoint.post(forged)
    assert response.status_code == 200 and response.json()["result"] == "applied"
    assert await pg_store.blacklisted([E164]) == {E164}


async def test_notification_hangs_up_the_call_through_the_worker(
    endpoint: Endpoint, identity: SigningIdentity, worker: WorkerServer, pg_store: PostgresStore,
) -> None:
    response = await endpoint.post(signed_optout(identity))

    assert response.status_code == 200
    assert worker.requests == [("/calls/call-123/hangup", "Bearer worker-secret")]
    [row] = await pg_store.history(E164)
    assert row.hangup_result == "ok"


async def test_failed_hangup_does_not_fail_the_optout(
    endpoint: Endpoint, identity: SigningIdentity, worker: WorkerServer, redis_sync: redis.Redis,
    pg_store: PostgresStore,
) -> None:
    worker.status = 500

    response = await endpoint.post(signed_optout(identity))

    assert response.status_code == 200
    assert response.json()["status"] == "stored"
    assert redis_sync.sismember(BLACKLIST_SET, E164)
    [row] = await pg_store.history(E164)
    assert row.hangup_result == "error: HTTP 500"


@pytest_asyncio.fixture
async def endpoint_store_down(
    journal: Journal, cache: RedisCache, transport: ToLocalServer
) -> AsyncIterator[Endpoint]:
    async with PostgresStore("postgresql://postgres@127.0.0.1:1/x", timeout=0.5) as dead:
        pipeline = OptOutPipeline(journal=journal, store=dead, cache=cache)
        handler = BridgeHandler(pipeline=pipeline, region="US", dedupe=MessageIdDedupe(redis=cache.client))
        async for ep in open_endpoint(handler, transport, journal):
            yield ep


async def test_store_down_still_answers_200_as_journaled(
    endpoint_store_down: Endpoint, identity: SigningIdentity,
) -> None:
    response = await endpoint_store_down.post(signed_optout(identity))

    assert response.status_code == 200
    assert response.json()["status"] == "journaled"
    [kept] = await endpoint_store_down.journal.unstored()
    assert kept.phone_number == E164


async def test_journal_failure_is_covered_by_the_store(
    endpoint: Endpoint, identity: SigningIdentity, pg_store: PostgresStore,
) -> None:
    await endpoint.journal.close()
    response = await endpoint.post(signed_optout(identity))
    assert response.status_code == 200 and response.json()["status"] == "stored"
    assert await pg_store.blacklisted([E164]) == {E164}


async def test_neither_journal_nor_store_answers_5xx_so_sns_retries(
    identity: SigningIdentity, transport: Any, tmp_path: Any, written: Callable[[], Any], pg_store: PostgresStore,
) -> None:
    from agent.journal import Journal
    from agent.pipeline import OptOutPipeline
    from agent.store_postgres import PostgresStore as Pg
    from sns_bridge.handler import BridgeHandler, MessageIdDedupe

    journal = Journal(tmp_path / "broken.db")
    async with Pg("postgresql://postgres@127.0.0.1:1/none", timeout=0.3) as dead:
        pipeline = OptOutPipeline(journal=journal, store=dead, cache=None)  # the journal was never opened
        handler = BridgeHandler(pipeline=pipeline, region="US", dedupe=MessageIdDedupe(redis=None))
        async for ep in open_endpoint(handler, transport, journal):
            response = await ep.post(signed_optout(identity))
    assert response.status_code == 503
    assert written().actions == 0


# --- subscriptions -------------------------------------------------------------------------------


async def test_subscription_confirmation_for_allowed_topic_gets_the_subscribe_url(
    endpoint: Endpoint, identity: SigningIdentity, cert_server: CertServer,
) -> None:
    response = await endpoint.post(sign(confirmation(), identity))

    assert response.status_code == 200
    assert any(path.startswith("/?Action=ConfirmSubscription") for path in cert_server.paths)


async def test_subscription_confirmation_for_other_topic_is_refused_without_any_fetch(
    endpoint: Endpoint, identity: SigningIdentity, cert_server: CertServer, transport: ToLocalServer,
) -> None:
    body = sign(confirmation(TopicArn=OTHER_TOPIC_ARN, SubscribeURL=f"https://sns.{REGION}.amazonaws.com/?x=1"),
                identity)

    response = await endpoint.post(body)

    assert response.status_code == 403
    assert cert_server.requests == []
    assert transport.urls == []


async def test_unsubscribe_confirmation_is_logged_and_answered_200(
    endpoint: Endpoint, identity: SigningIdentity, cert_server: CertServer,
) -> None:
    response = await endpoint.post(sign(confirmation("UnsubscribeConfirmation"), identity))

    assert response.status_code == 200
    assert not any(path.startswith("/?Action") for path in cert_server.paths)


# --- refused: 4xx and nothing written ------------------------------------------------------------


def _tampered(identity: SigningIdentity) -> dict[str, Any]:
    body = signed_optout(identity)
    body["Message"] = event_json(phoneNumber="+14155550123")
    return body


def _cert_url(url: str) -> Callable[[SigningIdentity], dict[str, Any]]:
    return lambda identity: signed_optout(identity, SigningCertURL=url)


REFUSED: dict[str, tuple[Callable[[SigningIdentity], Any], int]] = {
    "tampered Message": (_tampered, 403),
    "unknown TopicArn": (lambda i: signed_optout(i, TopicArn=OTHER_TOPIC_ARN), 403),
    "certificate over http": (_cert_url(f"http://sns.{REGION}.amazonaws.com{CERT_PATH}"), 403),
    "certificate on another host": (_cert_url(f"https://evil.example.com{CERT_PATH}"), 403),
    "certificate on S3 look-alike host": (_cert_url(f"https://sns.{REGION}.amazonaws.com.s3.amazonaws.com{CERT_PATH}"),
                                          403),
    "certificate in an S3 bucket path": (_cert_url(f"https://s3.amazonaws.com/sns.{REGION}.amazonaws.com{CERT_PATH}"),
                                         403),
    "certificate of another region": (_cert_url(f"https://sns.eu-west-1.amazonaws.com{CERT_PATH}"), 403),
    "stale timestamp": (lambda i: signed_optout(i, Timestamp="2026-11-25T10:00:00.000Z"), 403),
    "non-JSON Message": (lambda i: signed_optout(i, Message="phone=+972501234567"), 400),
    "Message not an object": (lambda i: signed_optout(i, Message="[1, 2]"), 400),
    "invalid phone number": (lambda i: signed_optout(i, Message=event_json(phoneNumber="12")), 400),
    "missing phoneNumber": (lambda i: signed_optout(i, Message=json.dumps({"callId": "call-123"})), 400),
    "missing Signature": (lambda i: {k: v for k, v in signed_optout(i).items() if k != "Signature"}, 400),
    "missing MessageId": (lambda i: sign({k: v for k, v in notification(Message=event_json()).items()
                                          if k != "MessageId"}, i), 400),
    "unknown Type": (lambda i: sign(notification(Type="Advertisement", Message=event_json()), i), 400),
    "body not JSON": (lambda i: b"Type=Notification&Message=hi", 400),
    "body a JSON list": (lambda i: [signed_optout(i)], 400),
    "oversized body": (lambda i: signed_optout(i, Message=event_json(contactId="x" * MAX_BODY)), 413),
    "body nested deeper than Python parses": (lambda i: b"[" * 5000 + b"]" * 5000, 400),
    "body with an integer over the digit limit": (lambda i: b'{"Type": ' + b"9" * 5000 + b"}", 400),
    "body not UTF-8": (lambda i: b'{"Type": "Notification\xff\xfe"}', 400),
    "Message nested deeper than Python parses": (lambda i: signed_optout(i, Message="[" * 5000 + "]" * 5000), 400),
    "Message with an integer over the digit limit": (lambda i: signed_optout(i, Message='{"n": ' + "9" * 5000 + "}"),
                                                     400),
}


@pytest.mark.parametrize("case", list(REFUSED))
async def test_forged_or_invalid_message_is_refused_and_writes_nothing(
    case: str, endpoint: Endpoint, identity: SigningIdentity, written: Callable[[], Any],
) -> None:
    build, status = REFUSED[case]

    response = await endpoint.post(build(identity))

    assert response.status_code == status, response.text
    assert written() == written().__class__(actions=0, blacklisted=0, redis_keys=0, journal_rows=0)


async def test_bad_signature_is_refused_and_writes_nothing(
    endpoint: Endpoint, stranger: SigningIdentity, written: Callable[[], Any],
) -> None:
    response = await endpoint.post(signed_optout(stranger))

    assert response.status_code == 403
    assert "Signature" in response.json()["error"]
    assert written().actions == written().redis_keys == written().journal_rows == 0


@pytest.mark.parametrize("case", ["certificate over http", "certificate on another host",
                                  "certificate on S3 look-alike host", "unknown TopicArn", "stale timestamp"])
async def test_refused_before_fetching_any_certificate(
    case: str, endpoint: Endpoint, identity: SigningIdentity, transport: ToLocalServer,
) -> None:
    build, status = REFUSED[case]

    response = await endpoint.post(build(identity))

    assert response.status_code == status
    assert transport.urls == []


async def test_redirecting_certificate_host_is_refused_with_4xx_and_not_followed(
    endpoint: Endpoint, identity: SigningIdentity, cert_server: CertServer, written: Callable[[], Any],
) -> None:
    cert_server.behaviour = "redirect"

    response = await endpoint.post(signed_optout(identity))

    assert response.status_code == 403
    assert cert_server.paths == [CERT_PATH]
    assert written().actions == written().redis_keys == written().journal_rows == 0


async def test_unreachable_certificate_host_answers_5xx_so_sns_retries(
    endpoint: Endpoint, identity: SigningIdentity, cert_server: CertServer, written: Callable[[], Any],
) -> None:
    await cert_server.stop()

    response = await endpoint.post(signed_optout(identity))

    assert response.status_code == 503
    assert written().actions == written().journal_rows == 0


async def test_header_disagreeing_with_body_is_refused(
    endpoint: Endpoint, identity: SigningIdentity, written: Callable[[], Any],
) -> None:
    response = await endpoint.post(signed_optout(identity), headers={"x-amz-sns-topic-arn": OTHER_TOPIC_ARN})

    assert response.status_code == 403
    assert written().journal_rows == 0


async def test_matching_headers_are_accepted(endpoint: Endpoint, identity: SigningIdentity) -> None:
    body = signed_optout(identity)
    headers = {"x-amz-sns-message-type": "Notification", "x-amz-sns-topic-arn": TOPIC_ARN,
               "x-amz-sns-message-id": body["MessageId"]}

    response = await endpoint.post(body, headers=headers)

    assert response.status_code == 200




async def test_an_invalid_optional_field_is_dropped_and_named_and_the_number_still_opts_out(
    endpoint: Endpoint, identity: SigningIdentity, pg_store: PostgresStore,
) -> None:
    response = await endpoint.post(signed_optout(identity, Message=event_json(campaignId="camp\u0000nul")))
    assert response.status_code == 200, response.text
    assert response.json()["dropped"] == ["field campaignId: contains a nul character"]
    [row] = await pg_store.history(E164)
    assert row.campaign_id is None and row.outcome == "blacklisted"


async def test_a_redelivered_notification_does_not_hang_up_the_call_again(
    endpoint: Endpoint, identity: SigningIdentity, worker: WorkerServer,
) -> None:
    body = signed_optout(identity)
    for message_id in ("7a1c0c6e-0000-4000-8000-0000000000a1", "7a1c0c6e-0000-4000-8000-0000000000a2"):
        # SNS redelivers with the same MessageId; a re-publish gets a new one: neither hangs up twice.
        response = await endpoint.post(sign({**notification(Message=body["Message"]), "MessageId": message_id},
                                            identity))
        assert response.status_code == 200
    assert len(worker.requests) == 1
