"""The operator's connection to the hub's REST API, with the hub's CA pinned."""

from __future__ import annotations

import hashlib
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from outpost.protocol import fingerprint
from outpost.protocol.errors import HubRefused, OutpostError, TransportError, entry

from .output import err
from .profiles import Profile


@dataclass
class Target:
    url: str
    token: str
    ca_pem: str


def _fingerprint(pem: str) -> str:
    from cryptography import x509  # only where a CA is pinned by its certificate
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(pem.encode())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


# A waiting command rides out this many seconds in a row without the hub, when the failure
# is one a restart or a network cut gives (not a wrong address, CA or token).
RIDE_OUT = 120.0
AWAY_KINDS = ("refused", "timeout", "other")


def _classify(exc: httpx.HTTPError) -> str:
    # Imported lazily: the agent's transport holds the one classification of failures.
    from outpost.agent.transport import classify

    return classify(exc)[0]


def resolve(hub: str | None, token: str | None, ca_fingerprint: str | None,
            data_dir: Path | None, profile: Profile | None = None) -> Target:
    """Where the hub is and how to trust it. Each piece from the first that gives it:
    flags (and their OUTPOST_HUB/OUTPOST_TOKEN/OUTPOST_CA_FINGERPRINT variables), then
    --data-dir, then ``profile``. A profile is not used at all with --data-dir, nor when
    --hub names a hub that is not the profile's: its token must not go to another hub."""
    ca_pem = ""
    if ca_fingerprint:  # a mistyped value is refused before anything is sent
        ca_fingerprint = fingerprint.parse(ca_fingerprint)
    if data_dir is not None:
        import yaml

        config_path = data_dir / "hub.yaml"
        if not config_path.exists():
            raise OutpostError("hub_not_initialised",
                               f"The hub data directory {data_dir} is not initialised.",
                               fix=f"Run 'outpost hub init --data-dir {data_dir}' first.")
        config = yaml.safe_load(config_path.read_text()) or {}
        hub = hub or config.get("url")
        ca_pem = (data_dir / "ca.pem").read_text()
        if not token:
            token = (data_dir / "admin.token").read_text().strip()
    elif profile is not None and (not hub or _same_hub(hub, profile.hub_urls)):
        hub = hub or profile.url
        token = token or profile.token()
        if not ca_fingerprint:
            ca_pem = _local_ca(profile)
            ca_fingerprint = fingerprint.parse(profile.ca_fingerprint)
    if not hub or not token:
        raise OutpostError("hub_cli_unconfigured", fix=UNCONFIGURED_FIX)
    if not ca_pem:
        if not ca_fingerprint:
            raise OutpostError(
                "hub_cli_unconfigured",
                "The hub's CA fingerprint is needed to trust the hub.",
                fix="Pass --ca-fingerprint (or set OUTPOST_CA_FINGERPRINT) with the value "
                    "'outpost hub init' printed, or use a profile ('outpost profile list').")
        ca_pem = fetch_ca(hub, ca_fingerprint)
    return Target(hub.rstrip("/"), token, ca_pem)


UNCONFIGURED_FIX = entry("hub_cli_unconfigured").fixes[0]


def _same_hub(url: str, urls: list[str]) -> bool:
    return url.rstrip("/") in {u.rstrip("/") for u in urls}


def _local_ca(profile: Profile) -> str:
    """The CA from the profile's hub data directory when it is on this machine and is the
    pinned one: no need to fetch it."""
    if profile.data_dir is None:
        return ""
    try:
        pem = (profile.data_dir / "ca.pem").read_text()
        same = _fingerprint(pem) == fingerprint.parse(profile.ca_fingerprint)
    except (OSError, ValueError):
        return ""
    return pem if same else ""


def fetch_ca(url: str, expected_fingerprint: str) -> str:
    expected = fingerprint.parse(expected_fingerprint)
    try:
        response = httpx.get(url.rstrip("/") + "/v1/ca", verify=False, timeout=10)
    except httpx.HTTPError as exc:
        raise TransportError(_classify(exc), url, str(exc)) from exc
    pem = response.text
    try:
        seen = _fingerprint(pem)
    except ValueError:
        seen = ""
    if seen != expected:
        raise OutpostError(
            "tls_untrusted_issuer",
            f"The hub at {url} did not present the CA with fingerprint {expected}. "
            "A proxy may be intercepting TLS.",
            url=url, expected_fingerprint=expected)
    return pem


class Api:
    def __init__(self, target: Target, timeout: float = 30.0) -> None:
        ctx = ssl.create_default_context(cadata=target.ca_pem)
        self.target = target
        self._lost_since: float | None = None
        self._client = httpx.Client(
            base_url=target.url, verify=ctx, timeout=timeout,
            headers={"Authorization": f"Bearer {target.token}"})

    def call(self, method: str, path: str, json: Any = None,
             params: dict[str, Any] | None = None, timeout: float | None = None,
             content: bytes | None = None, content_type: str | None = None,
             headers: dict[str, str] | None = None) -> Any:
        """One request: a JSON body (``json``), or raw bytes (``content``) of
        ``content_type``."""
        headers = dict(headers or {})
        if content_type:
            headers["Content-Type"] = content_type
        try:
            response = self._client.request(
                method, path, json=json, params=params, content=content, headers=headers,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT)
        except httpx.HTTPError as exc:
            raise TransportError(_classify(exc), self.target.url, str(exc)) from exc
        try:
            data = response.json() if response.content else {}
        except ValueError:
            data = {"code": "E3006", "message": f"HTTP {response.status_code}"}
        if response.is_success:
            return data
        raise HubRefused(response.status_code, data if isinstance(data, dict) else {})

    def get(self, path: str, **kw: Any) -> Any:
        return self.call("GET", path, **kw)

    def get_riding_out(self, path: str, **kw: Any) -> Any:
        """``get`` for a command that waits (``--wait``, ``--follow``): while the hub is away
        (restarting, or the network between is down) it tries again, with backoff, for up to
        RIDE_OUT seconds in a row, saying so once on stderr. A wrong address, CA or token
        still fails at once."""
        return self._riding_out(lambda: self.get(path, **kw))

    def post_once(self, path: str, json: Any = None, **kw: Any) -> Any:
        """``post`` of a request that creates work (a job start), made safe to send again: it
        carries a new Idempotency-Key, and while the hub is away it is sent again with the
        same key as ``get_riding_out`` does, so the hub creates the work once whether or not
        an earlier answer was lost (hub/idempotency.py)."""
        headers = {"Idempotency-Key": str(uuid.uuid4())}
        return self._riding_out(lambda: self.call("POST", path, json=json, headers=headers,
                                                  **kw))

    def _riding_out(self, request: Callable[[], Any]) -> Any:
        delay = 0.2
        while True:
            try:
                answer = request()
            except (TransportError, HubRefused) as exc:
                away = (isinstance(exc, TransportError) and exc.kind in AWAY_KINDS) or \
                    (isinstance(exc, HubRefused) and exc.status in (502, 503, 504))
                now = time.monotonic()
                if not away or (self._lost_since is not None
                                and now - self._lost_since > RIDE_OUT):
                    raise
                if self._lost_since is None:
                    self._lost_since = now
                    err.print(f"warning: lost the hub ({exc.message}); trying again for up "
                              f"to {RIDE_OUT:.0f} s", markup=False)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if self._lost_since is not None:
                err.print(f"the hub answers again (after {time.monotonic() - self._lost_since:.1f}"
                          " s)", markup=False)
                self._lost_since = None
            return answer

    def post(self, path: str, json: Any = None, **kw: Any) -> Any:
        return self.call("POST", path, json=json, **kw)

    def put(self, path: str, json: Any = None) -> Any:
        return self.call("PUT", path, json=json)

    def delete(self, path: str) -> Any:
        return self.call("DELETE", path)
