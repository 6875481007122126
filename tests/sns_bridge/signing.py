"""Test helpers: play Amazon SNS.

An RSA key with a self-signed certificate, messages signed the way SNS signs them (the string
to sign is built here independently of ``sns_bridge.verify``), a local aiohttp server that plays
the SNS certificate host, and the httpx transport that routes the real-looking certificate URL to
that server. The transport is the only seam: ``sns_bridge`` still sees and checks the real URL.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

REGION = "us-east-1"
TOPIC_ARN = f"arn:aws:sns:{REGION}:123456789012:optout-events"
OTHER_TOPIC_ARN = f"arn:aws:sns:{REGION}:123456789012:someone-else"
CERT_PATH = "/SimpleNotificationService-abc123.pem"
CERT_URL = f"https://sns.{REGION}.amazonaws.com{CERT_PATH}"
# Where the redirecting server sends the client: a URL that would pass every check.
REDIRECT_TARGET_PATH = "/SimpleNotificationService-def456.pem"
SUBSCRIBE_URL = (
    f"https://sns.{REGION}.amazonaws.com/?Action=ConfirmSubscription"
    f"&TopicArn={TOPIC_ARN}&Token=2336412f37fb687f5d51e6e2425c464de12884cd"
)
NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)

_NOTIFICATION_FIELDS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
_CONFIRMATION_FIELDS = ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type")


@dataclass(frozen=True)
class SigningIdentity:
    key: rsa.RSAPrivateKey
    cert_pem: bytes


def make_identity(common_name: str = "sns.amazonaws.com") -> SigningIdentity:
    """An RSA-2048 key and a self-signed certificate for it, valid a day either side of now."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return SigningIdentity(key, certificate.public_bytes(serialization.Encoding.PEM))


def aws_string_to_sign(message: dict[str, Any]) -> bytes:
    """The string SNS signs, per AWS's documentation (written apart from the code under test)."""
    names = _NOTIFICATION_FIELDS if message["Type"] == "Notification" else _CONFIRMATION_FIELDS
    lines = [f"{name}\n{message[name]}\n" for name in names if message.get(name) is not None]
    return "".join(lines).encode()


def sign(message: dict[str, Any], identity: SigningIdentity, *, version: str = "2") -> dict[str, Any]:
    """Return ``message`` with SignatureVersion and Signature set as SNS would set them."""
    algorithm: hashes.HashAlgorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
    signed = {**message, "SignatureVersion": version}
    signature = identity.key.sign(aws_string_to_sign(signed), padding.PKCS1v15(), algorithm)
    signed["Signature"] = base64.b64encode(signature).decode()
    return signed


def notification(**overrides: Any) -> dict[str, Any]:
    """An unsigned Notification body, sent at NOW."""
    message: dict[str, Any] = {
        "Type": "Notification",
        "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
        "TopicArn": TOPIC_ARN,
        "Subject": "opt-out",
        "Message": '{"phone": "+972501234567", "event": "optout"}',
        "Timestamp": "2026-11-25T12:00:00.000Z",
        "SigningCertURL": CERT_URL,
        "UnsubscribeURL": f"https://sns.{REGION}.amazonaws.com/?Action=Unsubscribe&SubscriptionArn=x",
        "MessageAttributes": {"origin": {"Type": "String", "Value": "dialer"}},
    }
    message.update(overrides)
    return message


def confirmation(kind: str = "SubscriptionConfirmation", **overrides: Any) -> dict[str, Any]:
    """An unsigned SubscriptionConfirmation (or UnsubscribeConfirmation) body, sent at NOW."""
    message: dict[str, Any] = {
        "Type": kind,
        "MessageId": "165545c9-2a5c-472c-8df2-7ff2be2b3b1b",
        "Token": "2336412f37fb687f5d51e6e2425c464de12884cd",
        "TopicArn": TOPIC_ARN,
        "Message": f"You have chosen to subscribe to the topic {TOPIC_ARN}.",
        "SubscribeURL": SUBSCRIBE_URL,
        "Timestamp": "2026-11-25T12:00:00.000Z",
        "SigningCertURL": CERT_URL,
    }
    message.update(overrides)
    return message


class CertServer:
    """Local HTTP server playing the SNS certificate host; records every request.

    ``behaviour`` picks the answer: "serve" the PEM, "redirect" to another certificate URL
    (which would serve the PEM if followed), "not-found", "oversized" or "slow" (answers after
    ``delay`` seconds, or at stop()).
    """

    def __init__(self, pem: bytes) -> None:
        self.pem = pem
        self.behaviour = "serve"
        self.delay = 0.0
        self.requests: list[tuple[str, str]] = []  # (Host header, path)
        self.base_url = ""
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._answer)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        self.base_url = f"http://{host}:{port}"

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def paths(self) -> list[str]:
        return [path for _, path in self.requests]

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.host, request.path_qs))
        if self.behaviour == "slow":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._release.wait(), self.delay)
        if self.behaviour == "redirect" and request.path == CERT_PATH:
            raise web.HTTPFound(f"https://sns.{REGION}.amazonaws.com{REDIRECT_TARGET_PATH}")
        if self.behaviour == "not-found":
            raise web.HTTPNotFound()
        if self.behaviour == "oversized":
            return web.Response(body=self.pem + b"\n" * 20_000, content_type="application/x-pem-file")
        return web.Response(body=self.pem, content_type="application/x-pem-file")


class ToLocalServer(httpx.AsyncBaseTransport):
    """Sends every request to the local server, keeping method, path, query and headers.

    The Host header still names the SNS host, so the server can see what was asked for.
    """

    def __init__(self, base_url: str) -> None:
        self._base = httpx.URL(base_url)
        self._inner = httpx.AsyncHTTPTransport()
        self.urls: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.urls.append(str(request.url))
        local = request.url.copy_with(scheme=self._base.scheme, host=self._base.host, port=self._base.port)
        forwarded = httpx.Request(
            request.method,
            local,
            headers=request.headers,
            stream=request.stream,
            extensions=request.extensions,
        )
        return await self._inner.handle_async_request(forwarded)

    async def aclose(self) -> None:
        await self._inner.aclose()
