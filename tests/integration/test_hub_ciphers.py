"""The hub's TLS: only strong ciphers, and the client's choice among them.

A client that lists AES-128-GCM first (restic does, on a CPU with AES instructions) gets it,
one that lists AES-256-GCM first gets that: the hub no longer imposes its own first choice
(hub/server.py, ``client_cipher_order``; docs/architecture.md, "Ciphers"). A TLS 1.2 client
that offers only a cipher without forward secrecy or without AEAD is refused, and one that
offers ECDHE with AES-GCM is served.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess

import pytest

from tests.support import Hub

SUITES = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384")


def _negotiated(hub: Hub, suites: list[str]) -> str:
    """The TLS 1.3 suite the hub picks for an OpenSSL client that offers ``suites`` in that
    order (Python's ssl module cannot order TLS 1.3 suites)."""
    done = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{hub.port}", "-tls1_3",
         "-ciphersuites", ":".join(suites), "-servername", "localhost"],
        input=b"", capture_output=True, timeout=30)
    text = done.stdout.decode(errors="replace")
    for suite in SUITES:
        if f"Cipher is {suite}" in text:
            return suite
    raise AssertionError(f"no suite in openssl's output:\n{text}\n{done.stderr!r}")


def _tls12(hub: Hub, ciphers: str) -> str:
    context = ssl.create_default_context(cafile=str(hub.data_dir / "ca.pem"))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(ciphers)
    with socket.create_connection(("127.0.0.1", hub.port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        cipher = tls.cipher()
        assert cipher is not None
        return cipher[0]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is needed "
                    "to offer TLS 1.3 suites in a chosen order (apt-get install openssl)")
def test_the_client_picks_among_strong_ciphers(sqlite_hub: Hub) -> None:
    hub = sqlite_hub
    assert _negotiated(hub, list(SUITES)) == "TLS_AES_128_GCM_SHA256"
    assert _negotiated(hub, list(reversed(SUITES))) == "TLS_AES_256_GCM_SHA384"
    assert "AES" in _tls12(hub, "ECDHE+AESGCM")
    for weak in ("AES128-SHA", "AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA"):
        with pytest.raises(ssl.SSLError):
            _tls12(hub, weak)
