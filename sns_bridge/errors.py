"""Errors raised by the SNS bridge.

Hierarchy::

    BridgeError
    ├── SnsMessageInvalid            the body is not an SNS message: a field is missing or
    │                                not a string, Type is unknown, Timestamp or TopicArn
    │                                does not parse
    ├── EventRejected                the SNS message is fine, but its Message is not a valid
    │                                opt-out (not JSON, a field missing, an invalid number)
    ├── ConfirmationFailed           the SubscribeURL could not be fetched (transient)
    ├── NotStored                    Lambda: opt-outs not in the store yet (raised so Lambda retries)
    └── SnsVerificationError         well-formed, but not proven to come from an allowed topic
        ├── TopicNotAllowed          TopicArn is not in the allow-list
        ├── MessageNotFresh          Timestamp is too old or too far in the future
        ├── UrlRejected              SigningCertURL or SubscribeURL is not an SNS endpoint
        ├── CertificateUnavailable   the signing certificate could not be fetched or used
        ├── CertificateRefused       the certificate host redirected or answered 4xx
        ├── SignatureInvalid         unsupported SignatureVersion, Signature not base64, or
        │                            the signature does not match the message
        └── HeaderMismatch           an x-amz-sns-* header disagrees with the body

SNS drops a message for good when the endpoint answers 4xx and retries on 5xx. Only
``CertificateUnavailable`` and ``ConfirmationFailed`` can be transient (network trouble);
every other error is permanent. A failure to make an opt-out durable is the agent's
``JournalError``, also answered 5xx.
"""


class BridgeError(Exception):
    """Base class of every error the SNS bridge raises."""


class SnsMessageInvalid(BridgeError):
    """The message is malformed: a field is missing, has the wrong type or does not parse."""


class SnsVerificationError(BridgeError):
    """The message is well-formed but could not be verified as coming from an allowed topic."""


class TopicNotAllowed(SnsVerificationError):
    """TopicArn is not in the configured allow-list."""


class MessageNotFresh(SnsVerificationError):
    """Timestamp lies outside the accepted window (too old, or in the future)."""


class UrlRejected(SnsVerificationError):
    """SigningCertURL or SubscribeURL does not point at the SNS endpoint of the topic's region."""


class CertificateUnavailable(SnsVerificationError):
    """The signing certificate could not be fetched, was too large, or is not an RSA certificate.

    The only error that may be transient: answer 5xx so that SNS retries.
    """


class SignatureInvalid(SnsVerificationError):
    """The signature is unsupported, malformed, or does not match the string to sign."""


class HeaderMismatch(SnsVerificationError):
    """An ``x-amz-sns-*`` request header disagrees with the message body."""


class CertificateRefused(SnsVerificationError):
    """The certificate host answered with a redirect or a 4xx: no certificate will come from there.

    Raised by ``sns_bridge.verify.refuse_redirects_and_4xx``; permanent (answer 4xx).
    """


class EventRejected(BridgeError):
    """The notification's Message is not a valid opt-out; ``field`` names where the problem is."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"Message field {field}: {problem}")
        self.field = field
        self.problem = problem


class ConfirmationFailed(BridgeError):
    """Fetching the SubscribeURL failed; SNS retries the SubscriptionConfirmation on 5xx."""


class NotStored(BridgeError):
    """Lambda only: some opt-outs are not in the store yet. Raised so that Lambda retries the invocation.

    A Lambda's journal lives in /tmp, which outlives no cold start, so there success means stored.
    """
