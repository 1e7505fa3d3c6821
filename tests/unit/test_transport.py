"""The agent's HTTP seam: failure kinds, backoff, CA pinning helpers and URL fail-over.

No network: the hub is an ``httpx.MockTransport`` put in place of the real connection.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import socket
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.x509.oid import NameOID
from nacl.signing import SigningKey

from outpost import __version__
from outpost.agent import transport
from outpost.agent.transport import Backoff, Clock, HubClient, classify
from outpost.protocol import signing
from outpost.protocol.errors import HubRefused, OutpostError, TransportError


# --- classify ----------------------------------------------------------------------------
def _caused(exc: httpx.HTTPError, cause: BaseException, context: bool = False) -> Exception:
    if context:
        exc.__context__ = cause
    else:
        exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(("exc", "kind"), [
    (_caused(httpx.ConnectError("x"), ConnectionRefusedError(111, "Connection refused")),
     "refused"),
    (_caused(httpx.ConnectError("x"), OSError("wrapped"), context=False), "other"),
    (_caused(httpx.ConnectError("x"), socket.gaierror(-2, "Name or service not known")),
     "dns"),
    (_caused(httpx.ConnectError("x"), ssl.SSLError(1, "handshake failure"), context=True),
     "tls"),
    (httpx.ConnectError("[Errno -3] Temporary failure in name resolution"), "dns"),
    (httpx.ConnectError("[Errno 111] Connect call failed ('127.0.0.1', 1)"), "refused"),
    (httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"), "tls"),
    (httpx.ConnectTimeout("timed out"), "timeout"),
    (httpx.ReadTimeout("timed out"), "timeout"),
    (httpx.PoolTimeout("pool"), "timeout"),
    (httpx.ProxyError("407 Proxy Authentication Required"), "proxy"),
    (httpx.RemoteProtocolError("Server disconnected without sending a response."), "other"),
    (httpx.ReadError(""), "other"),
])
def test_classify(exc: Exception, kind: str) -> None:
    found, detail = classify(exc)
    assert found == kind
    assert detail  # never empty: the log line must say something


def test_classify_follows_a_deep_chain() -> None:
    inner = socket.gaierror(-2, "Name or service not known")
    middle = OSError("middle")
    middle.__cause__ = inner
    exc = _caused(httpx.ConnectError("outer"), middle)
    assert classify(exc) == ("dns", str(inner))


def test_classify_stops_on_a_cyclic_chain() -> None:
    a, b = httpx.ConnectError("a"), OSError("b")
    a.__cause__, b.__cause__ = b, a
    assert classify(a)[0] == "other"


# --- backoff -------------------------------------------------------------------------------
def test_backoff_grows_with_jitter_up_to_the_cap_and_resets() -> None:
    backoff = Backoff(base=0.5, cap=8)
    delays = [backoff.next() for _ in range(30)]
    assert 0.5 <= delays[0] <= 1.0
    assert 1.0 <= delays[1] <= 2.0
    assert all(d <= 8 for d in delays)
    assert all(4 <= d for d in delays[5:])
    assert backoff.failures == 30
    backoff.reset()
    assert backoff.failures == 0
    assert backoff.next() <= 1.0


def test_backoff_does_not_overflow_after_many_failures() -> None:
    backoff = Backoff(cap=60)
    backoff.failures = 10_000
    assert 30 <= backoff.next() <= 60


# --- clock and fingerprints --------------------------------------------------------------
def test_clock_offset_skews_only_the_agent_clock() -> None:
    now = dt.datetime.now(dt.timezone.utc)
    ahead = Clock(3600).now()
    assert 3599 < (ahead - now).total_seconds() < 3601
    assert abs((Clock().now() - now).total_seconds()) < 5
    stamp = Clock(-60).stamp()
    assert signing.parse_time(stamp).utcoffset() == dt.timedelta(0)


def _self_signed_pem() -> str:
    key = generate_private_key(SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def test_pem_fingerprint_is_sha256_of_the_der() -> None:
    pem = _self_signed_pem()
    der = x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)
    assert transport.pem_fingerprint(pem) == hashlib.sha256(der).hexdigest()
    assert transport.pem_fingerprint("\n" + pem + "\n\n") == hashlib.sha256(der).hexdigest()


@pytest.mark.parametrize("text", ["", "hello", "<html>captive portal</html>"])
def test_pem_fingerprint_refuses_what_is_not_a_certificate(text: str) -> None:
    with pytest.raises(ValueError):
        transport.pem_fingerprint(text)


def test_ssl_context_trusts_the_given_ca_and_needs_tls_12() -> None:
    ctx = transport.ssl_context(_self_signed_pem())
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert len(ctx.get_ca_certs()) == 1


# --- HubClient against a mock hub ----------------------------------------------------------
Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture
def mock_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Handler]]:
    """HubClient talks to the handler appended to the list instead of the network."""
    handlers: list[Handler] = []
    real = httpx.AsyncClient

    def client(**kwargs: Any) -> httpx.AsyncClient:
        kwargs.pop("proxy", None)
        kwargs["trust_env"] = False
        return real(transport=httpx.MockTransport(lambda r: handlers[-1](r)), **kwargs)

    monkeypatch.setattr(httpx, "AsyncClient", client)  # the module transport.py uses
    yield handlers


def _call(client: HubClient, *args: Any, **kwargs: Any) -> Any:
    async def go() -> Any:
        try:
            return await client.request(*args, **kwargs)
        finally:
            await client.aclose()
    return asyncio.run(go())


def _refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("[Errno 111] Connection refused") from ConnectionRefusedError(
        111, "Connection refused")


def test_machine_requests_are_signed_with_the_machine_key(mock_hub: list[Handler]) -> None:
    key = SigningKey.generate()
    seen: list[httpx.Request] = []

    def hub(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"ok": True})

    mock_hub.append(hub)
    client = HubClient(["https://hub:8443/"], None, machine_id="m-1", machine_key=key,
                       clock=Clock(120))
    assert _call(client, "POST", "/v1/agent/poll?wait=25", {"a": 1}) == {"ok": True}
    request = seen[0]
    assert str(request.url) == "https://hub:8443/v1/agent/poll?wait=25"
    h = request.headers
    assert h[signing.H_MACHINE] == "m-1"
    assert h[signing.H_AGENT_VERSION] == __version__
    assert h["user-agent"] == f"outpost-agent/{__version__}"
    assert h["content-type"] == "application/json"
    assert json.loads(request.content) == {"a": 1}
    skew = (signing.parse_time(h[signing.H_DATE]) - dt.datetime.now(dt.timezone.utc))
    assert 100 < skew.total_seconds() < 140  # the agent's skewed clock signs
    assert signing.verify_machine(bytes(key.verify_key), h[signing.H_SIGNATURE], "POST",
                                  "/v1/agent/poll?wait=25", h[signing.H_DATE],
                                  h[signing.H_NONCE], request.content)


def test_each_request_has_a_fresh_nonce(mock_hub: list[Handler]) -> None:
    nonces: list[str] = []

    def hub(request: httpx.Request) -> httpx.Response:
        nonces.append(request.headers[signing.H_NONCE])
        return httpx.Response(200, json={})

    mock_hub.append(hub)
    client = HubClient(["https://hub"], None, machine_id="m", machine_key=SigningKey.generate())

    async def twice() -> None:
        await client.request("POST", "/v1/agent/heartbeat", {})
        await client.request("POST", "/v1/agent/heartbeat", {})
        await client.aclose()

    asyncio.run(twice())
    assert len(set(nonces)) == 2


def test_registration_is_signed_with_the_account_key(mock_hub: list[Handler]) -> None:
    seen: list[httpx.Request] = []

    def hub(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201, json={"machine_id": "m"})

    mock_hub.append(hub)
    key = bytes(32)
    client = HubClient(["https://hub"], None)
    assert _call(client, "POST", "/v1/agent/register", {"name": "n"},
                 account=("acc-1", key)) == {"machine_id": "m"}
    h = seen[0].headers
    assert h[signing.H_ACCOUNT] == "acc-1"
    assert signing.H_MACHINE not in h
    assert 16 <= len(h[signing.H_NONCE]) <= 64  # a registration's replay is refused too
    assert signing.verify_account([key], h[signing.H_SIGNATURE], "POST", "/v1/agent/register",
                                  h[signing.H_DATE], seen[0].content, h[signing.H_NONCE])
    assert not signing.verify_account([key], h[signing.H_SIGNATURE], "POST",
                                      "/v1/agent/register", h[signing.H_DATE],
                                      seen[0].content)  # the nonce is signed


def test_fail_over_to_the_next_url_and_stay_there(mock_hub: list[Handler]) -> None:
    hosts: list[str] = []

    def hub(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        if request.url.host == "dead":
            return _refused(request)
        return httpx.Response(200, json={"host": request.url.host})

    mock_hub.append(hub)
    client = HubClient(["https://dead:1", "https://alive:2"], None)

    async def go() -> list[Any]:
        answers = [await client.request("GET", "/x"), await client.request("GET", "/x")]
        await client.aclose()
        return answers

    assert asyncio.run(go()) == [{"host": "alive"}, {"host": "alive"}]
    assert hosts == ["dead", "alive", "alive"]  # the second call starts where it worked
    assert client.url == "https://alive:2" and client.active == 1


def test_when_every_url_fails_the_last_failure_is_raised(mock_hub: list[Handler]) -> None:
    def hub(request: httpx.Request) -> httpx.Response:
        if request.url.host == "a":
            return _refused(request)
        raise httpx.ConnectError("x") from socket.gaierror(-2, "Name or service not known")

    mock_hub.append(hub)
    with pytest.raises(TransportError) as caught:
        _call(HubClient(["https://a", "https://b"], None), "GET", "/x")
    assert caught.value.kind == "dns"
    assert caught.value.details["url"] == "https://b"
    assert caught.value.code == "E2004"


def test_an_error_answer_does_not_fail_over(mock_hub: list[Handler]) -> None:
    hosts: list[str] = []
    body = {"code": "E1007", "reason": "agent_outdated", "message": "needs 99.0",
            "fix": "Upgrade.", "details": {"min_agent_version": "99.0"}}

    def hub(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        return httpx.Response(426, json=body)

    mock_hub.append(hub)
    with pytest.raises(HubRefused) as caught:
        _call(HubClient(["https://a", "https://b"], None), "POST", "/v1/agent/heartbeat", {})
    assert hosts == ["a"]
    exc = caught.value
    assert (exc.status, exc.code, exc.message) == (426, "E1007", "needs 99.0")
    assert exc.details == {"min_agent_version": "99.0"}


def test_a_hub_cut_off_from_its_database_fails_over(mock_hub: list[Handler]) -> None:
    """503 E3007: that hub cannot write (renew a lease, keep a record); another may."""
    hosts: list[str] = []
    down = {"code": "E3007", "reason": "database_unavailable", "message": "(refused)",
            "fix": "Wait.", "details": {"kind": "refused"}}

    def hub(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        if request.url.host == "a" or hosts.count("b") > 1:
            return httpx.Response(503, json=down)
        return httpx.Response(200, json={"host": request.url.host})

    mock_hub.append(hub)
    client = HubClient(["https://a", "https://b"], None)

    async def go() -> Any:
        first = await client.request("POST", "/v1/agent/heartbeat", {})
        try:
            await client.request("POST", "/v1/agent/heartbeat", {})
        finally:
            await client.aclose()
        return first

    with pytest.raises(HubRefused) as caught:  # both cut off: the first refusal is told
        assert asyncio.run(go()) == {"host": "b"}
    assert hosts == ["a", "b", "b", "a"] and client.url == "https://b"
    assert (caught.value.status, caught.value.code) == (503, "E3007")


@pytest.mark.parametrize(("status", "content"), [
    (502, b"<html>Bad Gateway</html>"),
    (500, b'["not", "an", "error", "body"]'),
    (404, b'{"detail": "Not Found"}'),
    # A 200 that is not the hub's JSON (a captive portal, a proxy's page) is no answer.
    (200, b"<html>Please log in to the Wi-Fi</html>"),
    (200, b'["a list"]'),
])
def test_answers_that_are_not_the_hubs_are_refusals(mock_hub: list[Handler], status: int,
                                                     content: bytes) -> None:
    mock_hub.append(lambda r: httpx.Response(status, content=content))
    with pytest.raises(HubRefused) as caught:
        _call(HubClient(["https://hub"], None), "GET", "/x")
    assert caught.value.code == "E3006"
    assert caught.value.status == status
    assert caught.value.message.startswith(f"HTTP {status}: ")


def test_empty_success_is_an_empty_answer(mock_hub: list[Handler]) -> None:
    mock_hub.append(lambda r: httpx.Response(204))
    assert _call(HubClient(["https://hub"], None), "POST", "/x") == {}


def test_no_urls_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        HubClient([], None)
    assert not issubclass(ValueError, OutpostError)
