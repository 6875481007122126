"""Errors raised by the SNS bridge.

Hierarchy::

    BridgeError
    ├── SnsMessageInvalid            the body is not an SNS message: a field is missing or
    │                                not a string, Type is unknown, Timestamp or TopicArn
    │                                does not parse
    └── SnsVerificationError         well-formed, but not proven to come from an allowed topic
        ├── TopicNotAllowed          TopicArn is not in the allow-list
        ├── MessageNotFresh          Timestamp is too old or too far in the future
        ├── UrlRejected              SigningCertURL or SubscribeURL is not an SNS endpoint
        ├── CertificateUnavailable   the signing certificate could not be fetched or used
        ├── SignatureInvalid         unsupported SignatureVersion, Signature not base64, or
        │                            the signature does not match the message
        └── HeaderMismatch           an x-amz-sns-* header disagrees with the body

SNS drops a message for good when the endpoint answers 4xx and retries on 5xx. Only
``CertificateUnavailable`` can be transient (network trouble on the certificate fetch);
every other error is permanent.
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
