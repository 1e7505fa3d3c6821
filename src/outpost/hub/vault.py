"""Secrets at rest: AES-GCM under the hub's master key, and hashes for tokens."""

from __future__ import annotations

import hashlib
import os
import secrets

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from outpost.protocol.signing import b64, unb64


class Vault:
    """Encrypts small secrets (account keys, asset values) for storage in the database."""

    def __init__(self, master_key: bytes) -> None:
        if len(master_key) != 32:
            raise ValueError("the master key must be 32 bytes")
        self._aead = AESGCM(master_key)
        self._master = master_key

    def seal(self, plaintext: bytes, context: str) -> str:
        nonce = os.urandom(12)
        return b64(nonce + self._aead.encrypt(nonce, plaintext, context.encode()))

    def open(self, sealed: str, context: str) -> bytes:
        raw = unb64(sealed)
        return self._aead.decrypt(raw[:12], raw[12:], context.encode())

    def derive_key(self, label: str) -> bytes:
        """A 32-byte key for one purpose (``label``), derived from the master key (HKDF)."""
        return HKDF(hashes.SHA256(), 32, salt=None, info=label.encode()).derive(self._master)


def new_account_key() -> str:
    return b64(secrets.token_bytes(32))


def new_token() -> str:
    return "opt_" + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    # Tokens carry 256 random bits, so a plain SHA-256 cannot be brute-forced.
    return hashlib.sha256(token.encode()).hexdigest()
