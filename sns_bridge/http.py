"""The bridge's HTTP(S) endpoint for SNS: `POST /sns` (aiohttp), plus `GET /health`.

The status code is what SNS acts on:

    200  applied, journaled (durable), duplicate, skipped (an agent's own event), confirmed, unsubscribe logged
    400  not an SNS message / not a valid opt-out (bad JSON, missing field, invalid number, unknown Type)
    403  not proven to come from an allowed topic (signature, certificate URL, topic, headers, timestamp)
    413  body over BRIDGE_MAX_BODY_BYTES
    503  the opt-out could not be made durable, or the certificate / SubscribeURL fetch failed: SNS retries

SNS drops a message for good on 4xx and retries on 5xx, so only transient failures answer 5xx.
"""

from __future__ import annotations

import json
import logging

import httpx
from aiohttp import web

from agent import metrics
from agent.errors import JournalError
from agent.http import AppServer, answer
from sns_bridge.errors import (
    CertificateRefused,
    CertificateUnavailable,
    ConfirmationFailed,
    EventRejected,
    SnsMessageInvalid,
    SnsVerificationError,
)
from sns_bridge.handler import BridgeHandler, attribute_values
from sns_bridge.verify import MessageType, SnsMessage, SnsVerifier, verify_headers

log = logging.getLogger("sns_bridge.http")


class BridgeHttp(AppServer):
    """Serves POST /sns on host:port (async context manager). `client` fetches SubscribeURLs; it is the caller's."""

    def __init__(
        self, *, handler: BridgeHandler, verifier: SnsVerifier, client: httpx.AsyncClient, host: str, port: int,
        max_body_bytes: int,
    ) -> None:
        self._handler = handler
        self._verifier = verifier
        self._client = client
        app = web.Application(client_max_size=max_body_bytes)
        app.router.add_post("/sns", self._sns)
        app.router.add_get("/health", self._health)
        super().__init__(app, host=host, port=port, name="SNS endpoint (POST /sns)")

    async def _health(self, request: web.Request) -> web.Response:
        return answer(200, status="ok")

    async def _sns(self, request: web.Request) -> web.Response:
        """One SNS delivery; never answers 500. What no rule above foresaw (a bug) is logged, counted and
        answered 503, so SNS retries instead of dropping what may be an opt-out."""
        try:
            return await self._handle(request)
        except web.HTTPException:
            raise  # aiohttp's own answers (413 for a body over the limit)
        except Exception:
            metrics.ISOLATED.labels("bridge").inc()
            log.exception("SNS message could not be handled; answering 503 so that SNS retries")
            return answer(503, error="the message could not be handled now; retry")

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()  # over client_max_size: aiohttp answers 413
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, nesting too deep, an int too long
            return self._refuse(400, f"body is not JSON that can be read: {type(exc).__name__}: {str(exc)[:120]}")
        try:
            verify_headers(request.headers, body)
            message = await self._verifier.verify(body)
        except CertificateRefused as exc:
            return self._refuse(403, str(exc))
        except CertificateUnavailable as exc:
            log.warning("SNS message not verified yet, SNS will retry: %s", exc)
            return answer(503, error=str(exc))
        except SnsMessageInvalid as exc:
            return self._refuse(400, str(exc))
        except SnsVerificationError as exc:
            return self._refuse(403, str(exc))
        if message.type is MessageType.SUBSCRIPTION_CONFIRMATION:
            return await self._confirm(message)
        if message.type is MessageType.UNSUBSCRIBE_CONFIRMATION:
            log.warning("SNS unsubscribed this endpoint from %s (MessageId %s)", message.topic_arn, message.message_id)
            return answer(200, result="unsubscribe noted")
        try:
            handled = await self._handler.apply(
                message_id=message.message_id, message=message.message,
                attributes=attribute_values(message.message_attributes),
            )
        except EventRejected as exc:
            return self._refuse(400, str(exc), message_id=message.message_id)
        except JournalError as exc:
            log.error("opt-out in SNS message %s not made durable, SNS will retry: %s", message.message_id, exc)
            return answer(503, error="the opt-out could not be made durable; retry")
        status = handled.status.value if handled.status else None
        extra = {"dropped": handled.dropped} if handled.dropped else {}
        return answer(200, result=handled.disposition.value, eventId=handled.event_id, status=status, **extra)

    async def _confirm(self, message: SnsMessage) -> web.Response:
        """GET the SubscribeURL; the verifier has checked the topic is allowed and the URL is SNS's."""
        assert message.subscribe_url is not None
        try:
            response = await self._client.get(message.subscribe_url)
            if response.status_code != 200:
                raise ConfirmationFailed(f"SubscribeURL answered HTTP {response.status_code}")
        except (httpx.HTTPError, ConfirmationFailed, CertificateRefused) as exc:
            log.warning("confirming the subscription to %s failed, SNS will resend: %s", message.topic_arn, exc)
            return answer(503, error=f"confirmation failed: {exc}")
        log.info("confirmed the subscription to %s", message.topic_arn)
        return answer(200, result="subscription confirmed")

    @staticmethod
    def _refuse(status: int, problem: str, *, message_id: str | None = None) -> web.Response:
        log.warning("refused an SNS message (%d): %s", status, problem, extra={"sns_message_id": message_id})
        return answer(status, error=problem)
