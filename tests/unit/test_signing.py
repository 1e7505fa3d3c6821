"""Request signing: the account HMAC for registration and the machine's Ed25519 signature.

The agent signs with PyNaCl and the hub verifies with cryptography, so these tests sign on
one side and verify on the other exactly as the two processes do.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from nacl.signing import SigningKey

from outpost.protocol import signing

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
STAMP = "2024-05-01T12:00:00.000+00:00"
BODY = b'{"name": "m1"}'


# --- base64 and time ---------------------------------------------------------------------
def test_b64_round_trip() -> None:
    data = bytes(range(256))
    assert signing.unb64(signing.b64(data)) == data


@pytest.mark.parametrize("text", ["not base64!", "abc", "YWJj\n", "YW Jj", "é"])
def test_unb64_is_strict(text: str) -> None:
    with pytest.raises(ValueError):
        signing.unb64(text)


def test_format_time_is_utc_with_milliseconds() -> None:
    moment = datetime(2024, 5, 1, 14, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    assert signing.format_time(moment) == "2024-05-01T12:00:00.123+00:00"


def test_parse_time_round_trips_and_needs_a_zone() -> None:
    assert signing.parse_time(STAMP) == datetime(2024, 5, 1, 12, tzinfo=timezone.utc)
    with pytest.raises(ValueError, match="time zone"):
        signing.parse_time("2024-05-01T12:00:00")
    with pytest.raises(ValueError):
        signing.parse_time("yesterday")


def test_skew_seconds_is_client_minus_hub() -> None:
    hub_now = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
    assert signing.skew_seconds("2024-05-01T12:16:00.000+00:00", hub_now) == 960
    assert signing.skew_seconds("2024-05-01T11:59:30.000+00:00", hub_now) == -30
    assert signing.MAX_SKEW_SECONDS == 15 * 60


def test_nonces_are_fresh() -> None:
    nonces = {signing.new_nonce() for _ in range(200)}
    assert len(nonces) == 200
    assert all(len(n) >= 16 for n in nonces)


# --- the canonical message -----------------------------------------------------------------
def test_canonical_covers_method_path_stamp_nonce_and_body_digest() -> None:
    message = signing.canonical("post", "/v1/agent/poll?wait=25", STAMP, BODY, "n1")
    assert message == "\n".join([
        "POST", "/v1/agent/poll?wait=25", STAMP, "n1", hashlib.sha256(BODY).hexdigest(),
    ]).encode()


# --- account HMAC (registration) ------------------------------------------------------------
def test_account_signature_is_hmac_sha256_of_the_canonical_message() -> None:
    sig = signing.sign_account(KEY, "POST", "/v1/agent/register", STAMP, BODY)
    expected = hmac.new(KEY, signing.canonical("POST", "/v1/agent/register", STAMP, BODY),
                        hashlib.sha256).digest()
    assert signing.unb64(sig) == expected


def test_account_signature_verifies_under_either_key() -> None:
    sig = signing.sign_account(OTHER_KEY, "POST", "/v1/agent/register", STAMP, BODY)
    assert signing.verify_account([KEY, OTHER_KEY], sig, "POST", "/v1/agent/register",
                                  STAMP, BODY)
    assert not signing.verify_account([KEY], sig, "POST", "/v1/agent/register", STAMP, BODY)
    assert not signing.verify_account([], sig, "POST", "/v1/agent/register", STAMP, BODY)


@pytest.mark.parametrize("change", ["method", "path", "stamp", "body"])
def test_account_signature_fails_when_anything_signed_changes(change: str) -> None:
    parts: dict[str, Any] = {"method": "POST", "path": "/v1/agent/register", "stamp": STAMP,
                             "body": BODY}
    sig = signing.sign_account(KEY, parts["method"], parts["path"], parts["stamp"],
                               parts["body"])
    parts[change] = {"method": "PUT", "path": "/v1/agent/register?x=1",
                     "stamp": "2024-05-01T12:00:01.000+00:00", "body": BODY + b" "}[change]
    assert not signing.verify_account([KEY], sig, parts["method"], parts["path"],
                                      parts["stamp"], parts["body"])


@pytest.mark.parametrize("signature", ["", "garbage", "é" * 44, "\x00" * 44,
                                       "ÿ" + "A" * 43])
def test_account_verify_answers_false_for_any_header_value(signature: str) -> None:
    # A header arrives decoded as latin-1: a non-ASCII byte must be a refusal, not a crash.
    assert signing.verify_account([KEY], signature, "POST", "/", STAMP, BODY) is False


# --- machine Ed25519 --------------------------------------------------------------------
def _public(key: SigningKey) -> bytes:
    return bytes(key.verify_key)


def test_machine_signature_from_the_agent_verifies_at_the_hub() -> None:
    key = SigningKey.generate()
    sig = signing.sign_machine(key, "POST", "/v1/agent/heartbeat", STAMP, "nonce-1", BODY)
    assert len(signing.unb64(sig)) == 64
    assert signing.verify_machine(_public(key), sig, "POST", "/v1/agent/heartbeat", STAMP,
                                  "nonce-1", BODY)


def test_machine_signature_from_a_cryptography_key_also_verifies() -> None:
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    sig = signing.sign_machine(key, "GET", "/v1/x", STAMP, "n", b"")
    assert signing.verify_machine(public, sig, "GET", "/v1/x", STAMP, "n", b"")


@pytest.mark.parametrize("change", ["method", "path", "stamp", "nonce", "body"])
def test_machine_signature_fails_when_anything_signed_changes(change: str) -> None:
    key = SigningKey.generate()
    parts: dict[str, Any] = {"method": "POST", "path": "/v1/agent/poll?wait=25",
                             "stamp": STAMP, "nonce": "n1", "body": BODY}
    sig = signing.sign_machine(key, parts["method"], parts["path"], parts["stamp"],
                               parts["nonce"], parts["body"])
    parts[change] = {"method": "GET", "path": "/v1/agent/poll?wait=1",
                     "stamp": "2024-05-01T12:00:00.001+00:00", "nonce": "n2",
                     "body": b"{}"}[change]
    assert not signing.verify_machine(_public(key), sig, parts["method"], parts["path"],
                                      parts["stamp"], parts["nonce"], parts["body"])


def test_machine_signature_of_another_key_is_refused() -> None:
    sig = signing.sign_machine(SigningKey.generate(), "POST", "/", STAMP, "n", BODY)
    assert not signing.verify_machine(_public(SigningKey.generate()), sig, "POST", "/", STAMP,
                                      "n", BODY)


@pytest.mark.parametrize(("public", "signature"), [
    (b"short", None),                       # not a 32-byte public key
    (None, "not base64"),
    (None, signing.b64(b"\x00" * 64)),
    (None, signing.b64(b"\x00" * 10)),
    (None, ""),
    (None, "é"),
])
def test_machine_verify_answers_false_for_malformed_input(public: bytes | None,
                                                          signature: str | None) -> None:
    key = SigningKey.generate()
    good = signing.sign_machine(key, "POST", "/", STAMP, "n", BODY)
    assert signing.verify_machine(public if public is not None else _public(key),
                                  signature if signature is not None else good,
                                  "POST", "/", STAMP, "n", BODY) is False
