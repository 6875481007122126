"""Verification of Amazon SNS messages (HTTP/S deliveries and SQS envelopes).

A valid signature only proves that *some* SNS topic sent the message, so the verifier
checks the TopicArn against an allow-list before anything else touches the network,
and only fetches certificates from ``https://sns.<region of the topic>.amazonaws.com``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from agent.lifecycle import Resource
from sns_bridge.errors import (
    CertificateRefused,
    CertificateUnavailable,
    HeaderMismatch,
    MessageNotFresh,
    SignatureInvalid,
    SnsMessageInvalid,
    TopicNotAllowed,
    UrlRejected,
)


class MessageType(StrEnum):
    NOTIFICATION = "Notification"
    SUBSCRIPTION_CONFIRMATION = "SubscriptionConfirmation"
    UNSUBSCRIBE_CONFIRMATION = "UnsubscribeConfirmation"


# Signed fields in signing order; Subject is signed only when present and not null.
_CONFIRMATION_SIGNED: Final = ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type")
_SIGNED_FIELDS: Final[Mapping[MessageType, tuple[str, ...]]] = {
    MessageType.NOTIFICATION: ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    MessageType.SUBSCRIPTION_CONFIRMATION: _CONFIRMATION_SIGNED,
    MessageType.UNSUBSCRIBE_CONFIRMATION: _CONFIRMATION_SIGNED,
}
_SIGNATURE_HASHES: Final[Mapping[str, Callable[[], hashes.HashAlgorithm]]] = {
    "1": hashes.SHA1,
    "2": hashes.SHA256,
}
# The Lambda event spells the certificate field SigningCertUrl.
_CERT_URL_FIELDS: Final = ("SigningCertURL", "SigningCertUrl")
_HEADER_FIELDS: Final = (
    ("x-amz-sns-message-type", "Type"),
    ("x-amz-sns-topic-arn", "TopicArn"),
    ("x-amz-sns-message-id", "MessageId"),
)
_PARTITION_DOMAINS: Final[Mapping[str, str]] = {
    "aws": "amazonaws.com",
    "aws-cn": "amazonaws.com.cn",
    "aws-us-gov": "amazonaws.com",
}
_TOPIC_ARN: Final = re.compile(
    r"arn:(aws|aws-cn|aws-us-gov):sns:([a-z]{2}(?:-[a-z]+)+-[0-9]+):[0-9]{12}:[A-Za-z0-9_-]{1,256}(?:\.fifo)?",
    re.ASCII,
)
_TIMESTAMP: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?Z", re.ASCII)
_CERT_PATH: Final = r"/SimpleNotificationService-[0-9A-Fa-f]+\.pem"
_CERT_PATH_RULE: Final = "/SimpleNotificationService-<hex>.pem"
# Region-independent shape, checked again by HttpCertificateSource before any request.
_ANY_CERT_URL: Final = re.compile(rf"https://sns\.[a-z0-9-]+\.amazonaws\.com(?:\.cn)?(?::443)?{_CERT_PATH}", re.ASCII)
_QUERY_CHARS: Final = r"[A-Za-z0-9\-._~%!$&'()*+,;=:@/?]*"


def utcnow() -> datetime:
    return datetime.now(UTC)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def _require_mapping(message: object) -> Mapping[str, Any]:
    if not isinstance(message, Mapping):
        raise SnsMessageInvalid(f"message: expected a JSON object, got {type(message).__name__}")
    return message


def _required_str(message: Mapping[str, Any], name: str) -> str:
    value = message.get(name)
    if value is None:
        raise SnsMessageInvalid(f"field {name}: {'null' if name in message else 'missing'}")
    if not isinstance(value, str):
        raise SnsMessageInvalid(f"field {name}: expected a string, got {type(value).__name__}")
    return value


def _message_type(message: Mapping[str, Any]) -> MessageType:
    value = _required_str(message, "Type")
    try:
        return MessageType(value)
    except ValueError:
        known = ", ".join(kind.value for kind in MessageType)
        raise SnsMessageInvalid(f"field Type: {_show(value)} is not one of {known}") from None


def string_to_sign(message: Mapping[str, Any]) -> bytes:
    """Return the bytes SNS signs for ``message``: ``Name\\nValue\\n`` per signed field.

    Raises SnsMessageInvalid if Type is unknown or a signed field is missing or not a string.
    """
    message = _require_mapping(message)
    kind = _message_type(message)
    parts: list[bytes] = []
    for name in _SIGNED_FIELDS[kind]:
        if name == "Subject":
            subject = message.get("Subject")
            if subject is None:
                continue
            if not isinstance(subject, str):
                raise SnsMessageInvalid(f"field Subject: expected a string or null, got {type(subject).__name__}")
            value = subject
        else:
            value = _required_str(message, name)
        try:
            parts.append(f"{name}\n{value}\n".encode())
        except UnicodeEncodeError:
            raise SnsMessageInvalid(f"field {name}: contains a lone surrogate") from None
    return b"".join(parts)


def _sns_host(topic_arn: str) -> str:
    match = _TOPIC_ARN.fullmatch(topic_arn)
    if match is None:
        raise SnsMessageInvalid(
            f"field TopicArn: {_show(topic_arn)} is not an SNS topic ARN (arn:PARTITION:sns:REGION:ACCOUNT:NAME)"
        )
    partition, region = match.groups()
    return f"sns.{region}.{_PARTITION_DOMAINS[partition]}"


def _url_problem(url: str, host: str, *, path_rule: str, query_allowed: bool) -> str:
    """Explain why ``url`` failed its pattern; the pattern alone decides."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme != "https":
        return f"uses scheme {parts.scheme!r}, not https"
    if "@" in parts.netloc:
        return "carries user information"
    if parts.hostname != host:
        return f"has host {parts.hostname!r}, not {host}"
    if port not in (None, 443):
        return f"has port {port}, not 443"
    if parts.query and not query_allowed:
        return "has a query string"
    if parts.fragment:
        return "has a fragment"
    return f"does not match https://{host}{path_rule}"


def validate_signing_cert_url(url: str, topic_arn: str) -> None:
    """Accept only ``https://sns.<region>.amazonaws.com[.cn]/SimpleNotificationService-<hex>.pem``.

    The region (and partition) must be the TopicArn's. Raises UrlRejected otherwise, or
    SnsMessageInvalid if ``topic_arn`` is not an SNS topic ARN.
    """
    host = _sns_host(topic_arn)
    pattern = rf"https://{re.escape(host)}(?::443)?{_CERT_PATH}"
    if re.fullmatch(pattern, url, re.ASCII) is None:
        problem = _url_problem(url, host, path_rule=_CERT_PATH_RULE, query_allowed=False)
        raise UrlRejected(f"field SigningCertURL: {_show(url)} {problem}")


def validate_subscribe_url(url: str, topic_arn: str) -> None:
    """Accept only ``https://sns.<region>.amazonaws.com[.cn]/?...`` for the TopicArn's region.

    Raises UrlRejected otherwise, or SnsMessageInvalid if ``topic_arn`` is not a topic ARN.
    """
    host = _sns_host(topic_arn)
    pattern = rf"https://{re.escape(host)}(?::443)?/(?:\?{_QUERY_CHARS})?"
    if re.fullmatch(pattern, url, re.ASCII) is None:
        problem = _url_problem(url, host, path_rule="/?Action=ConfirmSubscription&...", query_allowed=True)
        raise UrlRejected(f"field SubscribeURL: {_show(url)} {problem}")


def verify_headers(headers: Mapping[str, str], message: Mapping[str, Any]) -> None:
    """Check that the ``x-amz-sns-*`` headers present agree with Type, TopicArn and MessageId.

    Header names are compared case-insensitively; absent headers are not required (SNS->SQS
    and some emulators send none). Raises HeaderMismatch or SnsMessageInvalid.
    """
    message = _require_mapping(message)
    lowered: dict[str, str] = {}
    for name, value in headers.items():
        key = name.lower()
        if key in lowered and lowered[key] != value:
            raise HeaderMismatch(f"header {key}: sent twice with different values")
        lowered[key] = value
    for header, field in _HEADER_FIELDS:
        if header in lowered and lowered[header] != message.get(field):
            raise HeaderMismatch(
                f"header {header}: {_show(lowered[header])} disagrees with field {field} {_show(message.get(field))}"
            )


@functools.lru_cache(maxsize=32)
def _rsa_key(pem: bytes) -> rsa.RSAPublicKey:
    try:
        key = x509.load_pem_x509_certificate(pem).public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CertificateUnavailable(f"signing certificate is not a usable PEM certificate: {exc}") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise CertificateUnavailable(f"signing certificate holds a {type(key).__name__}, not an RSA key")
    return key


@dataclass(frozen=True, slots=True)
class SnsMessage:
    """A verified SNS message.

    Every field but ``message_attributes`` is covered by the signature. ``subject`` is set
    for Notifications only, ``subscribe_url`` and ``token`` for confirmations only.
    """

    type: MessageType
    message_id: str
    topic_arn: str
    message: str
    timestamp: datetime
    subject: str | None
    subscribe_url: str | None
    token: str | None
    message_attributes: Mapping[str, Any]


async def refuse_redirects_and_4xx(response: httpx.Response) -> None:
    """The one rule for the certificate host (certificate and SubscribeURL fetches): a redirect or a 4xx is
    CertificateRefused, permanent (403, SNS stops); a 5xx may pass (503, SNS retries). Never followed."""
    if 300 <= response.status_code < 500:
        location = response.headers.get("location")
        raise CertificateRefused(f"fetch of {response.request.url} answered HTTP {response.status_code}" + (
            f" redirecting to {_show(location)}; redirects are refused" if location else ""))


def certificate_client(*, transport: httpx.AsyncBaseTransport | None = None, timeout: float = 5.0) -> httpx.AsyncClient:
    """The client for certificate and SubscribeURL fetches: the rule above on every response. (`transport`: tests.)"""
    return httpx.AsyncClient(transport=transport, follow_redirects=False, timeout=timeout,
                             event_hooks={"response": [refuse_redirects_and_4xx]})


class CertificateSource(Protocol):
    async def fetch(self, url: str) -> bytes:
        """Return the PEM certificate at ``url``, an already validated SigningCertURL.

        Raises CertificateUnavailable (or UrlRejected) when it cannot.
        """
        ...


@dataclass(frozen=True, slots=True)
class _CacheEntry:
    pem: bytes
    expires_at: float


class HttpCertificateSource(Resource):
    """Fetches signing certificates over HTTP(S) with ``client``; bounded LRU cache with a TTL.

    Redirects are refused, bodies over ``max_bytes`` and fetches over ``timeout`` seconds
    fail, and concurrent fetches of one URL share one request. Only URLs shaped like an SNS
    certificate URL are fetched. The client is the caller's to open and close.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        timeout: float = 5.0,
        max_bytes: int = 16_384,
        cache_size: int = 32,
        cache_ttl: timedelta = timedelta(hours=6),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size must be at least 1, got {cache_size}")
        self._client = client
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._cache_size = cache_size
        self._cache_ttl = cache_ttl.total_seconds()
        self._monotonic = monotonic
        self._cache: OrderedDict[str, _CacheEntry] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[bytes]] = {}

    async def close(self) -> None:
        """Cancel fetches still running and forget cached certificates. Idempotent."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._cache.clear()

    async def fetch(self, url: str) -> bytes:
        if _ANY_CERT_URL.fullmatch(url) is None:
            raise UrlRejected(f"certificate URL {_show(url)} is not an SNS certificate URL")
        entry = self._cache.get(url)
        if entry is not None:
            if entry.expires_at > self._monotonic():
                self._cache.move_to_end(url)
                return entry.pem
            del self._cache[url]
        task = self._inflight.get(url)
        if task is None:
            task = asyncio.create_task(self._download(url), name="sns-certificate-fetch")
            self._inflight[url] = task
            task.add_done_callback(functools.partial(self._forget_task, url))
        try:
            # Shielded: one caller's cancellation must not cancel the fetch others wait on.
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                raise CertificateUnavailable(f"fetch of {url} was cancelled by close()") from None
            raise

    def _forget_task(self, url: str, task: asyncio.Task[bytes]) -> None:
        if self._inflight.get(url) is task:
            del self._inflight[url]
        if not task.cancelled():
            task.exception()  # marks the exception retrieved when every waiter has gone

    async def _download(self, url: str) -> bytes:
        try:
            async with asyncio.timeout(self._timeout):
                body = await self._get(url)
        except TimeoutError:
            raise CertificateUnavailable(f"fetch of {url} took over {self._timeout} s") from None
        except httpx.HTTPError as exc:
            raise CertificateUnavailable(f"fetch of {url} failed: {exc!r}") from exc
        _rsa_key(body)
        self._cache[url] = _CacheEntry(body, self._monotonic() + self._cache_ttl)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return body

    async def _get(self, url: str) -> bytes:
        async with self._client.stream("GET", url, follow_redirects=False, timeout=self._timeout) as response:
            await refuse_redirects_and_4xx(response)
            if response.status_code != 200:
                raise CertificateUnavailable(f"fetch of {url} answered HTTP {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > self._max_bytes:
                    raise CertificateUnavailable(f"certificate at {url} exceeds {self._max_bytes} bytes")
            return bytes(body)


class SnsVerifier:
    """Verifies SNS messages from an allow-list of topics.

    ``max_age`` bounds how old a Timestamp may be: SNS keeps a message's Timestamp across
    redeliveries, so it must exceed the longest retry (or SQS queueing) delay in use.
    ``clock`` must return timezone-aware datetimes.
    """

    def __init__(
        self,
        *,
        allowed_topic_arns: frozenset[str],
        certificates: CertificateSource,
        max_age: timedelta = timedelta(hours=1),
        max_clock_skew: timedelta = timedelta(minutes=5),
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        if not allowed_topic_arns:
            raise ValueError("allowed_topic_arns is empty: every message would be rejected")
        for arn in allowed_topic_arns:
            if _TOPIC_ARN.fullmatch(arn) is None:
                raise ValueError(f"allowed_topic_arns: {arn!r} is not an SNS topic ARN")
        self._allowed = allowed_topic_arns
        self._certificates = certificates
        self._max_age = max_age
        self._max_clock_skew = max_clock_skew
        self._clock = clock

    async def verify(self, message: Mapping[str, Any]) -> SnsMessage:
        """Verify a parsed SNS JSON body and return it as an SnsMessage.

        Raises SnsMessageInvalid when the body is malformed and an SnsVerificationError
        subclass when it is not proven to come from an allowed topic. Nothing is fetched
        unless the topic is allowed, the Timestamp is fresh and the URLs are SNS's own.
        """
        message = _require_mapping(message)
        payload = string_to_sign(message)
        kind = MessageType(message["Type"])
        topic_arn: str = message["TopicArn"]
        version = _required_str(message, "SignatureVersion")
        signature_text = _required_str(message, "Signature")
        cert_field = next((name for name in _CERT_URL_FIELDS if name in message), _CERT_URL_FIELDS[0])
        cert_url = _required_str(message, cert_field)
        attributes = message.get("MessageAttributes", {})
        if not isinstance(attributes, Mapping):
            raise SnsMessageInvalid(f"field MessageAttributes: expected an object, got {type(attributes).__name__}")

        _sns_host(topic_arn)
        if topic_arn not in self._allowed:
            raise TopicNotAllowed(f"field TopicArn: {_show(topic_arn)} is not in BRIDGE_TOPIC_ARNS")
        timestamp = self._fresh_timestamp(message["Timestamp"])
        hash_algorithm = _SIGNATURE_HASHES.get(version)
        if hash_algorithm is None:
            raise SignatureInvalid(f"field SignatureVersion: {_show(version)} is not supported ('1' or '2')")
        try:
            signature = base64.b64decode(signature_text, validate=True)
        except (binascii.Error, ValueError):
            raise SignatureInvalid(f"field Signature: {_show(signature_text)} is not base64") from None
        validate_signing_cert_url(cert_url, topic_arn)
        if kind is not MessageType.NOTIFICATION:
            validate_subscribe_url(message["SubscribeURL"], topic_arn)

        key = _rsa_key(await self._certificates.fetch(cert_url))
        try:
            key.verify(signature, payload, padding.PKCS1v15(), hash_algorithm())
        except InvalidSignature:
            raise SignatureInvalid(
                f"field Signature: does not match the message (SignatureVersion {version}, certificate {cert_url})"
            ) from None

        notification = kind is MessageType.NOTIFICATION
        return SnsMessage(
            type=kind,
            message_id=message["MessageId"],
            topic_arn=topic_arn,
            message=message["Message"],
            timestamp=timestamp,
            subject=message.get("Subject") if notification else None,
            subscribe_url=None if notification else message["SubscribeURL"],
            token=None if notification else message["Token"],
            message_attributes=MappingProxyType(dict(attributes)),
        )

    def _fresh_timestamp(self, value: str) -> datetime:
        if _TIMESTAMP.fullmatch(value) is None:
            raise SnsMessageInvalid(f"field Timestamp: {_show(value)} is not a UTC time like 2026-11-25T12:25:11.945Z")
        try:
            timestamp = datetime.fromisoformat(value)
        except ValueError:
            raise SnsMessageInvalid(f"field Timestamp: {_show(value)} is not a valid date and time") from None
        age = self._clock() - timestamp
        if age > self._max_age:
            raise MessageNotFresh(f"field Timestamp: {value} is {age} old, over the {self._max_age} limit")
        if -age > self._max_clock_skew:
            raise MessageNotFresh(
                f"field Timestamp: {value} is {-age} in the future, over the {self._max_clock_skew} skew limit"
            )
        return timestamp
