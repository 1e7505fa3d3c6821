"""The agent's one outbound HTTPS conversation with the hub.

This is the seam to httpx: every exception of the HTTP stack is translated here, once, into
``TransportError`` with a kind (dns, refused, timeout, tls, proxy, other) or into
``HubRefused`` with the hub's error body. The hub's CA is pinned: only certificates issued
by the CA whose fingerprint was given at registration are trusted.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import socket
import ssl
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlsplit

import httpx
from nacl.signing import SigningKey

from outpost import __version__
from outpost.protocol import fingerprint, signing
from outpost.protocol.errors import HubRefused, OutpostError, TransportError

log = logging.getLogger("outpost.agent.transport")


class Clock:
    """The agent's notion of now; tests skew it through ``offset`` instead of the system."""

    def __init__(self, offset_seconds: float = 0.0) -> None:
        self.offset = timedelta(seconds=offset_seconds)

    def now(self) -> datetime:
        return datetime.now(timezone.utc) + self.offset

    def stamp(self) -> str:
        return signing.format_time(self.now())


def pem_fingerprint(pem: str) -> str:
    """SHA-256 of the certificate's DER; raises ValueError for anything but one PEM cert."""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.strip())).hexdigest()


def ssl_context(ca_pem: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca_pem)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def issuer_seen(url: str) -> str:
    """The issuer of the certificate a server presents, read without trusting it."""
    # Only on this error path: cryptography's X.509 module costs memory the daemon keeps.
    from cryptography import x509

    parts = urlsplit(url)
    try:
        pem = ssl.get_server_certificate((parts.hostname or "", parts.port or 443), timeout=5)
        return x509.load_pem_x509_certificate(pem.encode()).issuer.rfc4514_string()
    except (OSError, ValueError) as exc:
        return f"unknown ({exc})"


def untrusted_issuer(url: str, expected: str) -> OutpostError:
    issuer = issuer_seen(url)
    return OutpostError(
        "tls_untrusted_issuer",
        f"The certificate presented by the hub at {url} was not issued by the expected "
        f"authority: it was issued by '{issuer}', and this agent trusts only the CA with "
        f"SHA-256 fingerprint {expected}. A proxy may be intercepting TLS.",
        url=url, issuer=issuer, expected_fingerprint=expected,
    )


def classify(exc: Exception) -> tuple[str, str]:
    """(kind, detail) for an exception of the HTTP stack."""
    if isinstance(exc, httpx.ProxyError):
        return "proxy", str(exc) or "the proxy refused the connection"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout", type(exc).__name__
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(chain) < 10:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for item in chain:
        if isinstance(item, socket.gaierror):
            return "dns", str(item)
        if isinstance(item, ssl.SSLError):
            return "tls", str(item)
        if isinstance(item, ConnectionRefusedError):
            return "refused", str(item)
    text = str(exc)
    lowered = text.lower()
    if "name or service not known" in lowered or "nodename nor servname" in lowered \
            or "temporary failure in name resolution" in lowered:
        return "dns", text
    if "certificate" in lowered or "ssl" in lowered:
        return "tls", text
    if "connection refused" in lowered or "connect call failed" in lowered:
        return "refused", text
    if "proxy" in lowered:
        return "proxy", text
    return "other", text or type(exc).__name__


class Backoff:
    """Capped exponential backoff with full jitter."""

    def __init__(self, base: float = 0.5, cap: float = 60.0) -> None:
        self.base, self.cap, self.failures = base, cap, 0

    def next(self) -> float:
        self.failures += 1
        ceiling = min(self.cap, self.base * 2 ** min(self.failures, 20))
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0


# How long an idle connection is kept for the next request: longer than the heartbeat
# interval (30 s), so each heartbeat reuses its connection rather than paying a TLS handshake
# on both sides (httpx closes one idle for 5 s by default), and shorter than the hub's 75 s
# (server.py), so the agent never sends on a connection the hub is closing.
KEEPALIVE_SECONDS = 60.0


class HubClient:
    """Signed requests to the hub, trying each URL in order (ED-4 fail-over)."""

    def __init__(
        self,
        urls: list[str],
        ca_pem: str | None,
        *,
        clock: Clock | None = None,
        proxy: str | None = None,
        timeout: float = 15.0,
        machine_id: str | None = None,
        machine_key: SigningKey | None = None,
        ca_fingerprint: str = "",
        connections: int = 4,
    ) -> None:
        if not urls:
            raise ValueError("at least one hub URL is needed")
        self.urls = [u.rstrip("/") for u in urls]
        self.clock = clock or Clock()
        self.machine_id = machine_id
        self.machine_key = machine_key
        self.ca_fingerprint = ca_fingerprint
        self.active = 0  # index of the URL that answered last
        verify: ssl.SSLContext | bool = ssl_context(ca_pem) if ca_pem else False
        self._client = httpx.AsyncClient(
            verify=verify, proxy=proxy, trust_env=True, timeout=timeout,
            limits=httpx.Limits(max_connections=connections,
                                max_keepalive_connections=connections,
                                keepalive_expiry=KEEPALIVE_SECONDS),
            headers={"User-Agent": f"outpost-agent/{__version__}",
                     signing.H_AGENT_VERSION: __version__},
        )

    @property
    def url(self) -> str:
        return self.urls[self.active]

    async def aclose(self) -> None:
        await self._client.aclose()

    def _sign(self, method: str, path: str, body: bytes,
              account: tuple[str, bytes] | None) -> dict[str, str]:
        stamp = self.clock.stamp()
        nonce = signing.new_nonce()
        if account is not None:
            account_id, key = account
            return {signing.H_ACCOUNT: account_id, signing.H_DATE: stamp,
                    signing.H_NONCE: nonce,
                    signing.H_SIGNATURE: signing.sign_account(key, method, path, stamp, body,
                                                              nonce)}
        if self.machine_key is None or self.machine_id is None:
            return {}
        return {signing.H_MACHINE: self.machine_id, signing.H_DATE: stamp,
                signing.H_NONCE: nonce,
                signing.H_SIGNATURE: signing.sign_machine(self.machine_key, method, path, stamp,
                                                          nonce, body)}

    async def request(
        self, method: str, path: str, payload: Any = None, *,
        account: tuple[str, bytes] | None = None, timeout: float | None = None,
    ) -> Any:
        """Send one signed request; on a transport failure, or a 503 E3007 from a hub that
        cannot reach its database (or E3013 from one too busy), try the next URL in order.

        ``payload`` is sent as JSON; bytes are taken as JSON already encoded (the spool's
        records go out as they lie on disk).
        """
        if isinstance(payload, bytes):
            body = payload
        else:
            body = b"" if payload is None else json.dumps(payload).encode()
        last: TransportError | None = None
        cut_off: httpx.Response | None = None  # a hub that answered 503 E3007
        first = self.active
        moved: int | None = None  # where this request moved ``active`` to
        order = [first] + [i for i in range(len(self.urls)) if i != first]
        for pos, index in enumerate(order):
            base = self.urls[index]
            headers = self._sign(method, path, body, account)
            if body:
                headers["Content-Type"] = "application/json"
            try:
                response = await self._client.request(
                    method, base + path, content=body, headers=headers,
                    timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT)
            except httpx.HTTPError as exc:
                kind, detail = classify(exc)
                if kind == "tls" and "certificate verify failed" in detail and \
                        self.ca_fingerprint:
                    # A blocking look at the certificate: off the event loop.
                    raise await asyncio.to_thread(untrusted_issuer, base,
                                                  self.ca_fingerprint) from exc
                last = TransportError(kind, base, detail)
                if len(order) > 1:  # ED-4: each hub tried is named with its kind of failure
                    log.warning("hub %s unreachable (%s): %s%s", base, kind, detail,
                                "; trying the next hub URL" if index != order[-1] else "")
                if pos + 1 < len(order) and self.active == index:
                    # The next one is the hub this agent talks to while it answers (a
                    # long-poll there is held for many seconds before its answer comes).
                    self.active = moved = order[pos + 1]
                continue
            if len(order) > 1 and _database_down(response):
                # A replica cut off from the database: another may reach it, and this
                # machine's leases are renewed only through a hub that can write.
                why = ("cannot reach its database (E3007)"
                       if response.json().get("code") == "E3007" else "is overloaded (E3013)")
                log.warning("hub %s %s%s", base, why,
                            "; trying the next hub URL" if index != order[-1] else "")
                cut_off = cut_off or response
                continue
            if index != first:
                log.warning("now talking to hub %s (%s did not answer)", base,
                            self.urls[first])
            self.active = index
            return self._decode(response)
        if moved is not None and self.active == moved:
            self.active = first  # none answered: the next request starts where this one did
        if cut_off is not None:
            return self._decode(cut_off)  # raises: the database is the matter, not the network
        assert last is not None
        raise last

    async def fetch_bytes(self, path: str, *, timeout: float | None = None
                          ) -> tuple[bytes, dict[str, str]]:
        """A signed GET whose answer is not JSON (an extension package): its body and
        headers. Errors as ``request`` raises them; tried on each hub URL alike."""
        last: TransportError | None = None
        order = [self.active] + [i for i in range(len(self.urls)) if i != self.active]
        for index in order:
            base = self.urls[index]
            try:
                response = await self._client.request(
                    "GET", base + path, headers=self._sign("GET", path, b"", None),
                    timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT)
            except httpx.HTTPError as exc:
                kind, detail = classify(exc)
                last = TransportError(kind, base, detail)
                continue
            if not response.is_success:
                self._decode(response)  # raises HubRefused with the hub's error body
            self.active = index
            return response.content, dict(response.headers)
        assert last is not None
        raise last

    @staticmethod
    def _decode(response: httpx.Response) -> Any:
        try:
            data = response.json() if response.content else {}
        except ValueError:
            data = None  # not JSON: a proxy's or captive portal's page is no answer, even a 200
        if response.is_success and isinstance(data, dict):
            return data
        if not isinstance(data, dict) or "code" not in data:
            data = {"code": "E3006", "message": f"HTTP {response.status_code}: "
                    f"{response.text[:200]}"}
        raise HubRefused(response.status_code, data)


def _database_down(response: httpx.Response) -> bool:
    if response.status_code != 503:
        return False
    try:
        # E3007: cut off from its database; E3013: too busy to serve (another replica may
        # not be).
        return bool(response.json().get("code") in ("E3007", "E3013"))
    except (ValueError, AttributeError):
        return False


async def fetch_ca(url: str, expected_fingerprint: str, proxy: str | None = None,
                   timeout: float = 15.0) -> str:
    """The hub's CA certificate, accepted only if its fingerprint is the pinned one."""
    expected = fingerprint.parse(expected_fingerprint)
    async with httpx.AsyncClient(verify=False, proxy=proxy, trust_env=True,
                                 timeout=timeout) as client:
        try:
            response = await client.get(url.rstrip("/") + "/v1/ca")
        except httpx.HTTPError as exc:
            kind, detail = classify(exc)
            raise TransportError(kind, url, detail) from exc
    pem = response.text if response.is_success else ""
    try:
        seen = pem_fingerprint(pem) if pem else ""
    except ValueError:
        seen = ""
    if seen != expected:
        raise await asyncio.to_thread(untrusted_issuer, url, expected)
    return pem
