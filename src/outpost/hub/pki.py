"""The hub's certificate authority and TLS server certificate."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CA_DAYS = 3650
SERVER_DAYS = 825


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER encoding, lower-case hex: what agents pin."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(b"")
    path.chmod(0o600)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def create_ca(common_name: str, cert_path: Path, key_path: Path) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert


def create_server_cert(
    ca_cert_path: Path, ca_key_path: Path, hostnames: list[str], cert_path: Path, key_path: Path
) -> x509.Certificate:
    """A server certificate for localhost, 127.0.0.1 and every given host name.

    The certificate file holds the chain (server, then CA) so clients can see the issuer.
    """
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in ["localhost", "127.0.0.1", *hostnames]:
        if host in seen:
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0]
                                                    if hostnames else "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(key_path, key)
    cert_path.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + ca_cert.public_bytes(serialization.Encoding.PEM)
    )
    return cert


def _covers(cert: x509.Certificate, host: str) -> bool:
    """Whether the certificate's subject alternative names cover ``host`` (RFC 6125: a
    wildcard stands for one whole left-most label)."""
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None:
        return address in names.get_values_for_type(x509.IPAddress)
    host = host.lower().rstrip(".")
    for pattern in names.get_values_for_type(x509.DNSName):
        pattern = pattern.lower().rstrip(".")
        if pattern == host:
            return True
        if pattern.startswith("*.") and "." in host and host.split(".", 1)[1] == pattern[2:]:
            return True
    return False


def provided_chain(cert_path: Path, key_path: Path, hosts: list[str]) -> x509.Certificate:
    """Check a certificate chain and key given for the hub's listener; the CA agents pin.

    The file holds the server's certificate first, then each issuer, ending with the root
    CA; that root is what agents pin (an intermediate is renewed more often, and Python's
    TLS checks a chain up to a self-signed root). Raises OutpostError E8021-E8024.
    """
    from cryptography.exceptions import InvalidSignature

    from outpost.protocol.errors import OutpostError

    try:
        chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise OutpostError("tls_files_unreadable", f"Cannot read the certificate chain "
                           f"{cert_path}: {exc}", path=str(cert_path)) from exc
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise OutpostError("tls_files_unreadable", f"Cannot read the private key {key_path} "
                           f"(PEM, without a passphrase): {exc}", path=str(key_path)) from exc
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != chain[0].public_key().public_bytes(der, spki):
        raise OutpostError("tls_key_mismatch", f"The private key {key_path} does not belong to "
                           f"the certificate {chain[0].subject.rfc4514_string()} in "
                           f"{cert_path}.", cert=str(cert_path), key=str(key_path))
    missing = [host for host in hosts if not _covers(chain[0], host)]
    if missing:
        raise OutpostError("tls_hostname_not_covered", f"The certificate in {cert_path} does "
                           f"not cover {', '.join(missing)}; agents would refuse it.",
                           missing=missing)
    for cert, issuer in zip(chain[:-1], chain[1:], strict=True):
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise OutpostError("tls_chain_incomplete", f"In {cert_path}, "
                               f"'{cert.subject.rfc4514_string()}' was not issued by the "
                               f"certificate after it, '{issuer.subject.rfc4514_string()}'.",
                               path=str(cert_path)) from exc
    root = chain[-1]
    try:
        constraints = root.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = constraints.ca
        root.verify_directly_issued_by(root)
        self_signed = len(chain) > 1
    except (x509.ExtensionNotFound, ValueError, TypeError, InvalidSignature):
        is_ca = self_signed = False
    if not (is_ca and self_signed):
        raise OutpostError("tls_chain_incomplete", f"{cert_path} ends with "
                           f"'{root.subject.rfc4514_string()}', which is not a root CA: "
                           "agents pin the root CA at the end of the chain.",
                           path=str(cert_path))
    return root
