"""Reading certificate files, thumbprints, and the runbook helper's records (no I/O)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from outpost.agent.runbook_helper import outpost_runbook
from outpost.hub import assets, job_identity
from outpost.hub.vault import Vault
from outpost.protocol.errors import OutpostError


def _cert(cn: str, key: object = None, issuer: tuple[x509.Certificate, object] | None = None
          ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    own = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    signer_name, signer_key = (issuer[0].subject, issuer[1]) if issuer else (name, own)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(signer_name)
            .public_key(own.public_key())  # type: ignore[attr-defined]
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(signer_key, hashes.SHA256()))  # type: ignore[arg-type]
    return cert, own  # type: ignore[return-value]


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _key(key: object, password: bytes | None = None) -> bytes:
    enc = (serialization.BestAvailableEncryption(password) if password
           else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM,  # type: ignore[attr-defined, no-any-return]
                             serialization.PrivateFormat.PKCS8, enc)


def _code(call: object, *args: object) -> str:
    with pytest.raises(OutpostError) as caught:
        call(*args)  # type: ignore[operator]
    return caught.value.code


def test_pem_with_key_gives_the_windows_thumbprint() -> None:
    cert, key = _cert("web.example")
    read = assets.read_certificate(_pem(cert) + _key(key))
    der = cert.public_bytes(serialization.Encoding.DER)
    assert read.thumbprint == hashlib.sha1(der).hexdigest().upper()
    assert read.subject == "CN=web.example" and read.private_key_pem == _key(key).decode()
    assert read.not_after == pytest.approx(cert.not_valid_after_utc.timestamp())


def test_the_leaf_is_the_certificate_of_the_key_and_comes_first() -> None:
    ca = _cert("ca")
    leaf, key = _cert("leaf", issuer=ca)
    read = assets.read_certificate(_pem(ca[0], leaf) + _key(key))
    assert read.subject == "CN=leaf" and read.issuer == "CN=ca"
    assert read.certificate_pem.encode() == _pem(leaf, ca[0])


def test_encrypted_keys_and_pfx_passwords() -> None:
    cert, key = _cert("enc")
    encrypted = _pem(cert) + _key(key, b"pw")
    assert _code(assets.read_certificate, encrypted) == "E5004"
    assert _code(assets.read_certificate, encrypted, b"wrong") == "E5004"
    assert assets.read_certificate(encrypted, b"pw").private_key_pem == _key(key).decode()

    rsa_key = rsa.generate_private_key(65537, 2048)
    rsa_cert, _ = _cert("rsa", key=rsa_key)
    pfx = pkcs12.serialize_key_and_certificates(
        b"f", rsa_key, rsa_cert, None, serialization.BestAvailableEncryption(b"secret"))
    read = assets.read_certificate(pfx, b"secret")
    assert read.subject == "CN=rsa" and read.private_key_pem
    assert read.thumbprint == rsa_cert.fingerprint(hashes.SHA1()).hex().upper()
    assert _code(assets.read_certificate, pfx, b"nope") == "E5004"
    assert _code(assets.read_certificate, pfx) == "E5004"
    der = rsa_cert.public_bytes(serialization.Encoding.DER)
    assert assets.read_certificate(der).private_key_pem is None


def test_bad_files_are_certificate_invalid() -> None:
    cert, _ = _cert("a")
    _, other_key = _cert("b")
    assert _code(assets.read_certificate, b"\x00garbage") == "E5003"
    assert _code(assets.read_certificate, b"-----BEGIN CERTIFICATE-----\n!!\n"
                 b"-----END CERTIFICATE-----\n") == "E5003"
    assert _code(assets.read_certificate, _key(other_key)) == "E5003"  # a key, no certificate
    assert _code(assets.read_certificate, _pem(cert) + _key(other_key)) == "E5003"
    assert _code(assets.read_certificate, b"x" * (assets.FILE_LIMIT + 1)) == "E5005"


def test_thumbprints_as_people_paste_them() -> None:
    tp = "AB" * 20
    assert assets.as_thumbprint(tp.lower()) == tp
    assert assets.as_thumbprint("\u200e" + " ".join(["ab"] * 20)) == tp
    assert assets.as_thumbprint(":".join(["AB"] * 20)) == tp
    assert assets.as_thumbprint("web-tls") is None
    assert assets.as_thumbprint("AB" * 19) is None


def test_asset_kinds_and_names() -> None:
    assert assets.kind_of("Certificates") == "certificate"
    assert _code(assets.kind_of, "secret") == "E3003"
    assert _code(assets.check_name, "no spaces") == "E3003"
    assert _code(assets.check_name, "-leading") == "E3003"
    assets.check_name("db.prod_1-a")


def test_a_job_token_mac_covers_the_job_and_its_attempt() -> None:
    key = Vault(b"k" * 32).derive_key(job_identity.KEY_LABEL)
    assert key != Vault(b"m" * 32).derive_key(job_identity.KEY_LABEL)
    expected = base64.urlsafe_b64encode(
        hmac.new(key, b"j1:2", hashlib.sha256).digest()).decode().rstrip("=")
    assert job_identity._mac(key, "j1", 2) == expected
    assert expected not in (job_identity._mac(key, "j1", 3), job_identity._mac(key, "j2", 2))


def test_helper_records(capsys: pytest.CaptureFixture[str]) -> None:
    outpost_runbook.progress(40, "copying files")
    outpost_runbook.progress(100)
    outpost_runbook.warning("two\nlines")
    outpost_runbook.verbose("v")
    outpost_runbook.debug("d")
    assert capsys.readouterr().out.splitlines() == [
        "PROGRESS: 40% copying files", "PROGRESS: 100%", "WARNING: two", "WARNING: lines",
        "VERBOSE: v", "DEBUG: d"]
    for bad in (-1, 101, "40", True):
        with pytest.raises(ValueError):
            outpost_runbook.progress(bad)  # type: ignore[arg-type]
    assert outpost_runbook.main(["progress", "12.5", "half", "way"]) == 0
    assert capsys.readouterr().out == "PROGRESS: 12.5% half way\n"
