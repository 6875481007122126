from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
from signing import NOW, TOPIC_ARN, CertServer, SigningIdentity, ToLocalServer, make_identity

from sns_bridge.verify import HttpCertificateSource, SnsVerifier


@pytest.fixture(scope="session")
def identity() -> SigningIdentity:
    return make_identity()


@pytest.fixture(scope="session")
def stranger() -> SigningIdentity:
    """A key SNS never used: its signatures must not verify against ``identity``'s certificate."""
    return make_identity()


@pytest_asyncio.fixture
async def cert_server(identity: SigningIdentity) -> AsyncIterator[CertServer]:
    server = CertServer(identity.cert_pem)
    await server.start()
    yield server
    await server.stop()


@pytest_asyncio.fixture
async def transport(cert_server: CertServer) -> AsyncIterator[ToLocalServer]:
    transport = ToLocalServer(cert_server.base_url)
    yield transport
    await transport.aclose()


@pytest_asyncio.fixture
async def http_client(transport: ToLocalServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=transport) as client:
        yield client


@pytest_asyncio.fixture
async def certificates(http_client: httpx.AsyncClient) -> AsyncIterator[HttpCertificateSource]:
    async with HttpCertificateSource(http_client) as source:
        yield source


@pytest.fixture
def verifier(certificates: HttpCertificateSource) -> SnsVerifier:
    return SnsVerifier(allowed_topic_arns=frozenset({TOPIC_ARN}), certificates=certificates, clock=lambda: NOW)
