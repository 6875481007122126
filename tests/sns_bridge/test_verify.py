import asyncio
import re
from datetime import timedelta
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from signing import (
    CERT_PATH,
    CERT_URL,
    NOW,
    OTHER_TOPIC_ARN,
    REDIRECT_TARGET_PATH,
    TOPIC_ARN,
    CertServer,
    SigningIdentity,
    ToLocalServer,
    confirmation,
    notification,
    sign,
)

from sns_bridge.errors import (
    CertificateRefused,
    CertificateUnavailable,
    HeaderMismatch,
    MessageNotFresh,
    SignatureInvalid,
    SnsMessageInvalid,
    SnsVerificationError,
    TopicNotAllowed,
    UrlRejected,
)
from sns_bridge.verify import (
    HttpCertificateSource,
    MessageType,
    SnsVerifier,
    string_to_sign,
    validate_signing_cert_url,
    validate_subscribe_url,
    verify_headers,
)

# --- string to sign -------------------------------------------------------------------------


def test_string_to_sign_puts_subject_between_message_id_and_timestamp() -> None:
    message = notification(Message="hello\nworld", Subject="opt-out")
    assert string_to_sign(message) == (
        b"Message\nhello\nworld\n"
        b"MessageId\n22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324\n"
        b"Subject\nopt-out\n"
        b"Timestamp\n2026-11-25T12:00:00.000Z\n"
        b"TopicArn\narn:aws:sns:us-east-1:123456789012:optout-events\n"
        b"Type\nNotification\n"
    )


@pytest.mark.parametrize("subject", ["absent", None])
def test_string_to_sign_leaves_out_absent_or_null_subject(subject: str | None) -> None:
    message = notification(Subject=subject)
    if subject == "absent":
        del message["Subject"]
    signed = string_to_sign(message)
    assert b"Subject" not in signed
    assert signed.startswith(b"Message\n")
    assert b"\nMessageId\n22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324\nTimestamp\n" in signed


def test_string_to_sign_of_confirmation_includes_subscribe_url_and_token() -> None:
    message = confirmation(Message="m", MessageId="id", Token="tok", SubscribeURL="https://x/")
    assert string_to_sign(message) == (
        b"Message\nm\nMessageId\nid\nSubscribeURL\nhttps://x/\n"
        b"Timestamp\n2026-11-25T12:00:00.000Z\nToken\ntok\n"
        b"TopicArn\narn:aws:sns:us-east-1:123456789012:optout-events\nType\nSubscriptionConfirmation\n"
    )


# --- messages that verify -------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1", "2"])
async def test_signed_notification_verifies(
    verifier: SnsVerifier, identity: SigningIdentity, cert_server: CertServer, version: str
) -> None:
    result = await verifier.verify(sign(notification(), identity, version=version))

    assert result.type is MessageType.NOTIFICATION
    assert result.topic_arn == TOPIC_ARN
    assert result.message_id == "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324"
    assert result.message == '{"phone": "+972501234567", "event": "optout"}'
    assert result.subject == "opt-out"
    assert result.timestamp == NOW
    assert result.subscribe_url is None
    assert result.token is None
    assert result.message_attributes == {"origin": {"Type": "String", "Value": "dialer"}}
    assert cert_server.requests == [("sns.us-east-1.amazonaws.com", CERT_PATH)]


@pytest.mark.parametrize("subject", ["absent", None])
async def test_notification_without_subject_verifies(
    verifier: SnsVerifier, identity: SigningIdentity, subject: str | None
) -> None:
    message = notification(Subject=subject)
    if subject == "absent":
        del message["Subject"]
    result = await verifier.verify(sign(message, identity))
    assert result.subject is None


async def test_subject_is_covered_by_the_signature(verifier: SnsVerifier, identity: SigningIdentity) -> None:
    message = sign(notification(Subject="opt-out"), identity)
    with pytest.raises(SignatureInvalid, match="field Signature"):
        await verifier.verify({**message, "Subject": "opt-in"})
    with pytest.raises(SignatureInvalid):
        await verifier.verify({key: value for key, value in message.items() if key != "Subject"})


@pytest.mark.parametrize("kind", ["SubscriptionConfirmation", "UnsubscribeConfirmation"])
async def test_signed_confirmation_verifies(verifier: SnsVerifier, identity: SigningIdentity, kind: str) -> None:
    message = confirmation(kind)
    result = await verifier.verify(sign(message, identity, version="1"))
    assert result.type == kind
    assert result.subscribe_url == message["SubscribeURL"]
    assert result.token == message["Token"]
    assert result.subject is None


async def test_lambda_spelling_of_signing_cert_url_verifies(verifier: SnsVerifier, identity: SigningIdentity) -> None:
    message = sign(notification(), identity)
    message["SigningCertUrl"] = message.pop("SigningCertURL")
    assert (await verifier.verify(message)).message_id == message["MessageId"]


async def test_unsigned_fields_may_change(verifier: SnsVerifier, identity: SigningIdentity) -> None:
    message = sign(notification(), identity)
    message["MessageAttributes"] = {"origin": {"Type": "String", "Value": "optout-agent"}}
    message["UnsubscribeURL"] = "https://example.com/"
    result = await verifier.verify(message)
    assert result.message_attributes["origin"]["Value"] == "optout-agent"


# --- signature ------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["Message", "MessageId", "Timestamp", "Type"])
async def test_tampered_signed_field_fails(verifier: SnsVerifier, identity: SigningIdentity, field: str) -> None:
    message = sign(notification(), identity)
    tampered = {
        "Message": '{"phone": "+972509999999", "event": "optout"}',
        "MessageId": "00000000-0000-0000-0000-000000000000",
        "Timestamp": "2026-11-25T11:59:59.000Z",
        "Type": "SubscriptionConfirmation",
    }[field]
    extra = {"SubscribeURL": confirmation()["SubscribeURL"], "Token": "t"} if field == "Type" else {}
    with pytest.raises(SignatureInvalid, match="does not match the message"):
        await verifier.verify({**message, field: tampered, **extra})


async def test_signature_by_another_key_fails(verifier: SnsVerifier, stranger: SigningIdentity) -> None:
    with pytest.raises(SignatureInvalid, match="field Signature"):
        await verifier.verify(sign(notification(), stranger))


async def test_v1_signature_claimed_as_v2_fails(verifier: SnsVerifier, identity: SigningIdentity) -> None:
    message = sign(notification(), identity, version="1")
    with pytest.raises(SignatureInvalid):
        await verifier.verify({**message, "SignatureVersion": "2"})


@pytest.mark.parametrize("signature", ["not base64!", "QUJD=QUJD", "ab\u00e9"])
async def test_non_base64_signature_fails_without_fetch(
    verifier: SnsVerifier, identity: SigningIdentity, cert_server: CertServer, signature: str
) -> None:
    message = {**sign(notification(), identity), "Signature": signature}
    with pytest.raises(SignatureInvalid, match=r"field Signature: .* is not base64"):
        await verifier.verify(message)
    assert cert_server.requests == []


@pytest.mark.parametrize("version", ["3", "0", "", "SHA256"])
async def test_unsupported_signature_version_fails(
    verifier: SnsVerifier, identity: SigningIdentity, cert_server: CertServer, version: str
) -> None:
    message = sign(notification(), identity, version="2")
    with pytest.raises(SignatureInvalid, match=r"field SignatureVersion: .* is not supported"):
        await verifier.verify({**message, "SignatureVersion": version})
    assert cert_server.requests == []


# --- topic, type, fields, timestamp ---------------------------------------------------------


async def test_topic_outside_allow_list_fails_without_fetch(
    verifier: SnsVerifier, identity: SigningIdentity, cert_server: CertServer
) -> None:
    message = sign(notification(TopicArn=OTHER_TOPIC_ARN), identity)
    with pytest.raises(TopicNotAllowed, match=r"field TopicArn: '.*:someone-else' is not in BRIDGE_TOPIC_ARNS"):
        await verifier.verify(message)
    assert cert_server.requests == []


async def test_topic_arn_that_is_not_an_arn_fails(verifier: SnsVerifier, identity: SigningIdentity) -> None:
    with pytest.raises(SnsMessageInvalid, match=r"field TopicArn: .* is not an SNS topic ARN"):
        await verifier.verify(sign(notification(TopicArn="optout-events"), identity))


@pytest.mark.parametrize("kind", ["Unknown", "notification", "", "SubscriptionConfirmation "])
async def test_unknown_type_fails(verifier: SnsVerifier, identity: SigningIdentity, kind: str) -> None:
    with pytest.raises(SnsMessageInvalid, match=r"field Type: .* is not one of Notification"):
        await verifier.verify({**sign(notification(), identity), "Type": kind})


@pytest.mark.parametrize(
    ("kind", "field"),
    [
        *(
            ("Notification", f)
            for f in [
                "Message",
                "MessageId",
                "Timestamp",
                "TopicArn",
                "Type",
                "SignatureVersion",
                "Signature",
                "SigningCertURL",
            ]
        ),
        *(("SubscriptionConfirmation", f) for f in ["SubscribeURL", "Token"]),
    ],
)
async def test_missing_field_fails_naming_the_field(
    verifier: SnsVerifier, identity: SigningIdentity, kind: str, field: str
) -> None:
    message = sign(notification() if kind == "Notification" else confirmation(kind), identity)
    del message[field]
    with pytest.raises(SnsMessageInvalid, match=f"field {field}: missing"):
        await verifier.verify(message)


@pytest.mark.parametrize("value", [42, ["a"], {"a": 1}, True])
async def test_non_string_field_fails_naming_the_field(
    verifier: SnsVerifier, identity: SigningIdentity, value: object
) -> None:
    message = {**sign(notification(), identity), "MessageId": value}
    with pytest.raises(SnsMessageInvalid, match="field MessageId: expected a string"):
        await verifier.verify(message)


async def test_message_that_is_not_an_object_fails(verifier: SnsVerifier) -> None:
    with pytest.raises(SnsMessageInvalid, match="expected a JSON object, got list"):
        await verifier.verify([1, 2])  # type: ignore[arg-type]


async def test_message_attributes_that_are_not_an_object_fail(verifier: SnsVerifier, identity: SigningIdentity) -> None:
    with pytest.raises(SnsMessageInvalid, match="field MessageAttributes"):
        await verifier.verify({**sign(notification(), identity), "MessageAttributes": ["origin"]})


@pytest.mark.parametrize(
    "timestamp", ["2026-11-25 12:00:00Z", "2026-11-25T12:00:00+00:00", "2026-13-25T12:00:00Z", "yesterday"]
)
async def test_malformed_timestamp_fails(verifier: SnsVerifier, identity: SigningIdentity, timestamp: str) -> None:
    with pytest.raises(SnsMessageInvalid, match="field Timestamp"):
        await verifier.verify(sign(notification(Timestamp=timestamp), identity))


async def test_stale_timestamp_fails_without_fetch(
    verifier: SnsVerifier, identity: SigningIdentity, cert_server: CertServer
) -> None:
    with pytest.raises(MessageNotFresh, match=r"field Timestamp: .* old"):
        await verifier.verify(sign(notification(Timestamp="2026-11-25T10:59:59.999Z"), identity))
    assert cert_server.requests == []


async def test_timestamp_just_inside_max_age_verifies(verifier: SnsVerifier, identity: SigningIdentity) -> None:
    await verifier.verify(sign(notification(Timestamp="2026-11-25T11:00:00.000Z"), identity))


async def test_future_timestamp_fails(verifier: SnsVerifier, identity: SigningIdentity) -> None:
    with pytest.raises(MessageNotFresh, match="in the future"):
        await verifier.verify(sign(notification(Timestamp="2026-11-25T12:05:01Z"), identity))


async def test_small_clock_skew_is_tolerated(verifier: SnsVerifier, identity: SigningIdentity) -> None:
    await verifier.verify(sign(notification(Timestamp="2026-11-25T12:04:59Z"), identity))


# --- certificate URL ------------------------------------------------------------------------

REJECTED_CERT_URLS = {
    "http": "http://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc123.pem",
    "other host": "https://evil.example.com/SimpleNotificationService-abc123.pem",
    "s3 look-alike": "https://s3.amazonaws.com/sns.us-east-1.amazonaws.com/SimpleNotificationService-abc123.pem",
    "suffix look-alike": "https://sns.us-east-1.amazonaws.com.evil.com/SimpleNotificationService-abc123.pem",
    "dash look-alike": "https://sns-us-east-1.amazonaws.com/SimpleNotificationService-abc123.pem",
    "prefix look-alike": "https://xsns.us-east-1.amazonaws.com/SimpleNotificationService-abc123.pem",
    "other region": "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-abc123.pem",
    "extra port": "https://sns.us-east-1.amazonaws.com:8443/SimpleNotificationService-abc123.pem",
    "userinfo": "https://sns.us-east-1.amazonaws.com@evil.com/SimpleNotificationService-abc123.pem",
    "userinfo before real host": "https://evil.com@sns.us-east-1.amazonaws.com/SimpleNotificationService-abc123.pem",
    "wrong path": "https://sns.us-east-1.amazonaws.com/certs/SimpleNotificationService-abc123.pem",
    "not hex": "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-xyz.pem",
    "query string": "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc123.pem?x=1",
    "fragment": "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc123.pem#x",
    "trailing newline": "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc123.pem\n",
    "backslash": "https://sns.us-east-1.amazonaws.com\\@evil.com/SimpleNotificationService-abc123.pem",
}


@pytest.mark.parametrize("url", REJECTED_CERT_URLS.values(), ids=REJECTED_CERT_URLS.keys())
async def test_cert_url_outside_sns_fails_without_fetch(
    verifier: SnsVerifier, identity: SigningIdentity, cert_server: CertServer, transport: ToLocalServer, url: str
) -> None:
    with pytest.raises(UrlRejected, match="field SigningCertURL"):
        await verifier.verify(sign(notification(SigningCertURL=url), identity))
    assert transport.urls == []
    assert cert_server.requests == []


@pytest.mark.parametrize("url", REJECTED_CERT_URLS.values(), ids=REJECTED_CERT_URLS.keys())
def test_validate_signing_cert_url_rejects(url: str) -> None:
    with pytest.raises(UrlRejected):
        validate_signing_cert_url(url, TOPIC_ARN)


@pytest.mark.parametrize(
    ("url", "topic_arn"),
    [
        (CERT_URL, TOPIC_ARN),
        ("https://sns.us-east-1.amazonaws.com:443/SimpleNotificationService-0123abcdef.pem", TOPIC_ARN),
        (
            "https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-3242342098.pem",
            "arn:aws-cn:sns:cn-north-1:123456789012:optout-events",
        ),
        (
            "https://sns.us-gov-west-1.amazonaws.com/SimpleNotificationService-abc.pem",
            "arn:aws-us-gov:sns:us-gov-west-1:123456789012:optout-events.fifo",
        ),
    ],
)
def test_validate_signing_cert_url_accepts_sns_hosts(url: str, topic_arn: str) -> None:
    validate_signing_cert_url(url, topic_arn)


def test_cert_url_of_other_partition_is_rejected() -> None:
    with pytest.raises(UrlRejected, match=re.escape("not sns.cn-north-1.amazonaws.com.cn")):
        validate_signing_cert_url(
            "https://sns.cn-north-1.amazonaws.com/SimpleNotificationService-abc.pem",
            "arn:aws-cn:sns:cn-north-1:123456789012:optout-events",
        )


def test_rejected_cert_url_message_names_the_problem() -> None:
    with pytest.raises(UrlRejected, match="uses scheme 'http', not https"):
        validate_signing_cert_url(REJECTED_CERT_URLS["http"], TOPIC_ARN)
    with pytest.raises(UrlRejected, match=re.escape("has host 'sns.us-east-1.amazonaws.com.evil.com'")):
        validate_signing_cert_url(REJECTED_CERT_URLS["suffix look-alike"], TOPIC_ARN)
    with pytest.raises(UrlRejected, match="has port 8443"):
        validate_signing_cert_url(REJECTED_CERT_URLS["extra port"], TOPIC_ARN)


# --- subscribe URL --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription",
        "https://sns.us-east-1.amazonaws.com.evil.com/?Action=ConfirmSubscription",
        "https://evil.com/?Action=ConfirmSubscription&x=sns.us-east-1.amazonaws.com",
        "https://sns.eu-west-1.amazonaws.com/?Action=ConfirmSubscription",
        "https://sns.us-east-1.amazonaws.com:8080/?Action=ConfirmSubscription",
        "https://sns.us-east-1.amazonaws.com/redirect?Action=ConfirmSubscription",
        "https://user@sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription",
        "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription#frag",
    ],
)
def test_validate_subscribe_url_rejects(url: str) -> None:
    with pytest.raises(UrlRejected, match="field SubscribeURL"):
        validate_subscribe_url(url, TOPIC_ARN)


def test_validate_subscribe_url_accepts_sns_confirm_url() -> None:
    validate_subscribe_url(confirmation()["SubscribeURL"], TOPIC_ARN)


async def test_confirmation_with_foreign_subscribe_url_fails_even_when_signed(
    verifier: SnsVerifier, identity: SigningIdentity, cert_server: CertServer
) -> None:
    message = sign(confirmation(SubscribeURL="https://evil.com/?Action=ConfirmSubscription"), identity)
    with pytest.raises(UrlRejected, match="field SubscribeURL"):
        await verifier.verify(message)
    assert cert_server.requests == []


# --- fetching the certificate ---------------------------------------------------------------


async def test_redirecting_cert_server_fails_and_redirect_is_not_followed(
    verifier: SnsVerifier, identity: SigningIdentity, cert_server: CertServer
) -> None:
    cert_server.behaviour = "redirect"
    with pytest.raises(CertificateRefused, match=r"302 redirecting to .*def456\.pem'; redirects are refused"):
        await verifier.verify(sign(notification(), identity))
    assert cert_server.paths == [CERT_PATH]
    assert REDIRECT_TARGET_PATH not in cert_server.paths


async def test_cert_server_4xx_is_refused_for_good(
    verifier: SnsVerifier, identity: SigningIdentity, cert_server: CertServer
) -> None:
    cert_server.behaviour = "not-found"
    with pytest.raises(CertificateRefused, match="HTTP 404"):
        await verifier.verify(sign(notification(), identity))


async def test_oversized_certificate_fails(
    verifier: SnsVerifier, identity: SigningIdentity, cert_server: CertServer
) -> None:
    cert_server.behaviour = "oversized"
    with pytest.raises(CertificateUnavailable, match="exceeds 16384 bytes"):
        await verifier.verify(sign(notification(), identity))


async def test_body_that_is_not_a_certificate_fails(
    verifier: SnsVerifier, identity: SigningIdentity, cert_server: CertServer
) -> None:
    cert_server.pem = b"<html>hello</html>"
    with pytest.raises(CertificateUnavailable, match="not a usable PEM certificate"):
        await verifier.verify(sign(notification(), identity))


async def test_slow_cert_server_times_out(
    http_client: httpx.AsyncClient, identity: SigningIdentity, cert_server: CertServer
) -> None:
    cert_server.behaviour, cert_server.delay = "slow", 30.0
    async with HttpCertificateSource(http_client, timeout=0.2) as certificates:
        verifier = SnsVerifier(allowed_topic_arns=frozenset({TOPIC_ARN}), certificates=certificates, clock=lambda: NOW)
        with pytest.raises(CertificateUnavailable, match=re.escape("took over 0.2 s")):
            await verifier.verify(sign(notification(), identity))


async def test_certificate_is_fetched_once_for_repeated_verifications(
    verifier: SnsVerifier, identity: SigningIdentity, cert_server: CertServer
) -> None:
    await verifier.verify(sign(notification(), identity, version="1"))
    await verifier.verify(sign(notification(MessageId="second"), identity, version="2"))
    await verifier.verify(sign(confirmation(), identity))
    assert cert_server.paths == [CERT_PATH]


async def test_concurrent_verifications_share_one_fetch(
    verifier: SnsVerifier, identity: SigningIdentity, cert_server: CertServer
) -> None:
    cert_server.behaviour, cert_server.delay = "slow", 0.2
    messages = [sign(notification(MessageId=str(n)), identity) for n in range(5)]
    results = await asyncio.gather(*(verifier.verify(message) for message in messages))
    assert [result.message_id for result in results] == ["0", "1", "2", "3", "4"]
    assert cert_server.paths == [CERT_PATH]


async def test_cancelled_waiter_does_not_cancel_the_shared_fetch(
    certificates: HttpCertificateSource, cert_server: CertServer, identity: SigningIdentity
) -> None:
    cert_server.behaviour, cert_server.delay = "slow", 0.2
    first = asyncio.create_task(certificates.fetch(CERT_URL))
    second = asyncio.create_task(certificates.fetch(CERT_URL))
    await asyncio.sleep(0.05)
    first.cancel()
    assert await second == identity.cert_pem
    assert first.cancelled()
    assert cert_server.paths == [CERT_PATH]


async def test_cached_certificate_is_fetched_again_after_ttl(
    http_client: httpx.AsyncClient, cert_server: CertServer
) -> None:
    now = [1000.0]
    async with HttpCertificateSource(http_client, cache_ttl=timedelta(minutes=10), monotonic=lambda: now[0]) as source:
        await source.fetch(CERT_URL)
        now[0] += 599
        await source.fetch(CERT_URL)
        assert len(cert_server.requests) == 1
        now[0] += 2
        await source.fetch(CERT_URL)
        assert len(cert_server.requests) == 2


async def test_cache_keeps_only_the_most_recent_urls(http_client: httpx.AsyncClient, cert_server: CertServer) -> None:
    urls = [f"https://sns.us-east-1.amazonaws.com/SimpleNotificationService-{n:04x}.pem" for n in range(3)]
    async with HttpCertificateSource(http_client, cache_size=2) as source:
        for url in [*urls, urls[2], urls[0]]:
            await source.fetch(url)
    # urls[0] was evicted by urls[2]; urls[2] was still cached.
    assert cert_server.paths == [
        "/SimpleNotificationService-0000.pem",
        "/SimpleNotificationService-0001.pem",
        "/SimpleNotificationService-0002.pem",
        "/SimpleNotificationService-0000.pem",
    ]


async def test_http_source_refuses_urls_not_shaped_like_sns(
    certificates: HttpCertificateSource, cert_server: CertServer
) -> None:
    with pytest.raises(UrlRejected):
        await certificates.fetch("https://s3.amazonaws.com/SimpleNotificationService-abc.pem")
    assert cert_server.requests == []


# --- headers --------------------------------------------------------------------------------


def test_headers_agreeing_with_body_pass_whatever_their_case() -> None:
    message = notification()
    verify_headers(
        {
            "X-Amz-Sns-Message-Type": "Notification",
            "x-amz-sns-topic-arn": TOPIC_ARN,
            "X-AMZ-SNS-MESSAGE-ID": message["MessageId"],
            "x-amz-sns-subscription-arn": f"{TOPIC_ARN}:abc",
        },
        message,
    )


def test_absent_headers_pass() -> None:
    verify_headers({}, notification())


@pytest.mark.parametrize(
    ("header", "value", "field"),
    [
        ("x-amz-sns-message-type", "SubscriptionConfirmation", "Type"),
        ("X-Amz-Sns-Topic-Arn", OTHER_TOPIC_ARN, "TopicArn"),
        ("x-amz-sns-message-id", "another-id", "MessageId"),
    ],
)
def test_header_disagreeing_with_body_fails(header: str, value: str, field: str) -> None:
    with pytest.raises(HeaderMismatch, match=f"header {header.lower()}: .* disagrees with field {field}"):
        verify_headers({header: value}, notification())


def test_header_repeated_with_different_case_and_value_fails() -> None:
    with pytest.raises(HeaderMismatch, match="sent twice"):
        verify_headers({"x-amz-sns-topic-arn": TOPIC_ARN, "X-Amz-Sns-Topic-Arn": OTHER_TOPIC_ARN}, notification())


# --- construction ---------------------------------------------------------------------------


def test_verifier_refuses_empty_or_malformed_allow_list(certificates: HttpCertificateSource) -> None:
    with pytest.raises(ValueError, match="empty"):
        SnsVerifier(allowed_topic_arns=frozenset(), certificates=certificates)
    with pytest.raises(ValueError, match="not an SNS topic ARN"):
        SnsVerifier(allowed_topic_arns=frozenset({"arn:aws:sqs:us-east-1:123456789012:q"}), certificates=certificates)


# --- arbitrary input ------------------------------------------------------------------------


class InMemoryCertificates:
    """Serves one PEM for any URL the verifier lets through (a seam we own)."""

    def __init__(self, pem: bytes) -> None:
        self.pem = pem

    async def fetch(self, url: str) -> bytes:
        return self.pem


_text = st.text(st.characters(exclude_categories=())) | st.sampled_from(["\ud800", "", "1", "2", "Notification"])
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=12,
)
_FIELDS = [
    "Type",
    "MessageId",
    "TopicArn",
    "Subject",
    "Message",
    "Timestamp",
    "SignatureVersion",
    "Signature",
    "SigningCertURL",
    "SigningCertUrl",
    "SubscribeURL",
    "Token",
    "MessageAttributes",
    "UnsubscribeURL",
]
_SIGNED = {
    "Notification": ["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"],
    "SubscriptionConfirmation": ["Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"],
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=_json)
def test_arbitrary_json_raises_only_bridge_errors(identity: SigningIdentity, value: Any) -> None:
    verifier = SnsVerifier(
        allowed_topic_arns=frozenset({TOPIC_ARN}),
        certificates=InMemoryCertificates(identity.cert_pem),
        clock=lambda: NOW,
    )
    with pytest.raises((SnsMessageInvalid, SnsVerificationError)):
        asyncio.run(verifier.verify(value))


@settings(max_examples=300, deadline=None)
@given(
    base=st.sampled_from(["Notification", "SubscriptionConfirmation"]),
    removed=st.sets(st.sampled_from(_FIELDS), max_size=3),
    replaced=st.dictionaries(st.sampled_from(_FIELDS), _json, max_size=3),
)
def test_mutated_message_raises_only_bridge_errors_unless_signed_fields_are_intact(
    identity: SigningIdentity, base: str, removed: set[str], replaced: dict[str, Any]
) -> None:
    original = sign(notification() if base == "Notification" else confirmation(), identity)
    mutated = {key: value for key, value in original.items() if key not in removed} | replaced
    verifier = SnsVerifier(
        allowed_topic_arns=frozenset({TOPIC_ARN}),
        certificates=InMemoryCertificates(identity.cert_pem),
        clock=lambda: NOW,
    )
    try:
        asyncio.run(verifier.verify(mutated))
    except (SnsMessageInvalid, SnsVerificationError):
        return
    for field in _SIGNED[base]:
        assert mutated.get(field) == original.get(field)
