"""``outpost hub init --tls-cert/--tls-key``: the hub serves a certificate it did not make.

The test makes a root CA, an intermediate and a server certificate (as an organisation's PKI
would); the hub serves that chain, /v1/ca gives the root, agents pin the root's fingerprint
(the one init prints), register and become Healthy. Bad files are refused with their codes
before anything is written.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import ssl
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support import Agent, Hub, free_port, run_cli, wait_until

PEM = serialization.Encoding.PEM


def _cert(subject: str, key: ec.EllipticCurvePrivateKey,
          issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
          ca: bool, names: list[str] = ()) -> x509.Certificate:  # type: ignore[assignment]
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer[0].subject if issuer else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=365))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    if names:
        sans: list[x509.GeneralName] = []
        for host in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


class Pki:
    """A test organisation's root CA, an intermediate, and server certificates."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = _cert("Test Org Root CA", self.root_key, None, True)
        self.mid_key = ec.generate_private_key(ec.SECP256R1())
        self.mid = _cert("Test Org Issuing CA", self.mid_key, (self.root, self.root_key), True)

    @property
    def root_fingerprint(self) -> str:
        return hashlib.sha256(self.root.public_bytes(serialization.Encoding.DER)).hexdigest()

    def server(self, name: str, hosts: list[str], chain: str = "full") -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = _cert(hosts[0] if hosts else "server", key, (self.mid, self.mid_key), False,
                     hosts)
        certs = {"full": [leaf, self.mid, self.root], "leaf": [leaf],
                 "no-root": [leaf, self.mid], "wrong-order": [leaf, self.root, self.mid]}
        cert_path, key_path = self.tmp / f"{name}.pem", self.tmp / f"{name}.key"
        cert_path.write_bytes(b"".join(c.public_bytes(PEM) for c in certs[chain]))
        key_path.write_bytes(key.private_bytes(PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def test_the_hub_serves_the_given_chain_and_agents_pin_its_root(
        pki: Pki, tmp_path: Path) -> None:
    cert, key = pki.server("hub", ["localhost", "127.0.0.1"])
    data_dir, port = tmp_path / "hub", free_port()
    done = run_cli("hub", "init", "--data-dir", str(data_dir), "--bind", f"127.0.0.1:{port}",
                   "--tls-cert", str(cert), "--tls-key", str(key))
    assert done.returncode == 0, done.stderr
    assert f"CA fingerprint: {pki.root_fingerprint}" in done.stdout
    assert pki.root_fingerprint in done.stdout.split("sh -c", 1)[1]  # the install line pins it
    config = yaml.safe_load((data_dir / "hub.yaml").read_text())
    assert (config["tls_cert"], config["tls_key"]) == (str(cert), str(key))
    assert not (data_dir / "ca.key").exists() and not (data_dir / "server.pem").exists()
    init = json.loads(run_cli("hub", "init", "--data-dir", str(data_dir), "--json").stdout)
    assert init["ca_fingerprint"] == pki.root_fingerprint

    hub = Hub(data_dir, port, f"sqlite:///{tmp_path / 'hub.db'}", init)
    agent: Agent | None = None
    try:
        hub.start()  # its readiness probe trusts only data_dir/ca.pem: the root
        served = ssl.get_server_certificate(("127.0.0.1", port))
        assert served.strip() == cert.read_text().split("-----END CERTIFICATE-----")[0].strip() \
            + "\n-----END CERTIFICATE-----"
        with hub.client() as client:
            ca = client.get("/v1/ca")
        assert ca.headers["X-Outpost-CA-Fingerprint"] == pki.root_fingerprint
        assert ca.text == pki.root.public_bytes(PEM).decode()

        state = tmp_path / "agent"
        registered = run_cli(*hub.register_args(state, "tls1", "web"))
        assert registered.returncode == 0, registered.stdout + registered.stderr
        agent = Agent(state, "tls1").start()
        wait_until(lambda: hub.machines()["tls1"]["status"] == "Healthy", 20, 0.2,
                   "the agent behind the given certificate to be Healthy")
        checked = run_cli("hub", "check", "--data-dir", str(data_dir),
                          "--database-url", hub.database_url, "--output", "json")
        tls = [c for c in json.loads(checked.stdout)["checks"]
               if c["id"] == "tls-certificate"]
        assert tls and tls[0]["result"] == "ok", checked.stdout
        assert str(cert) in tls[0]["details"]
    finally:
        if agent is not None:
            agent.stop()
        hub.stop()


@pytest.mark.parametrize(("case", "code", "text"), [
    ("mismatched key", "E8022", "does not belong to the certificate"),
    ("other host", "E8023", "does not cover hub.example.com"),
    ("leaf only", "E8024", "which is not a root CA"),
    ("no root", "E8024", "which is not a root CA"),
    ("wrong order", "E8024", "was not issued by the certificate after it"),
    ("not pem", "E8021", "Cannot read the certificate chain"),
    ("cert alone", "E3003", "--tls-cert and --tls-key go together"),
])
def test_bad_certificate_files_are_refused_before_anything_is_written(
        pki: Pki, tmp_path: Path, case: str, code: str, text: str) -> None:
    cert, key = pki.server("good", ["localhost", "hub.example.com"])
    args = ["--tls-cert", str(cert), "--tls-key", str(key)]
    if case == "mismatched key":
        args[3] = str(pki.server("other", ["localhost"])[1])
    elif case == "other host":
        cert, key = pki.server("narrow", ["localhost"])
        args = ["--hostname", "hub.example.com", "--tls-cert", str(cert), "--tls-key",
                str(key)]
    elif case in ("leaf only", "no root", "wrong order"):
        cert, key = pki.server("partial", ["localhost"], case.replace(" only", "")
                               .replace(" ", "-"))
        args = ["--tls-cert", str(cert), "--tls-key", str(key)]
    elif case == "not pem":
        cert.write_bytes(b"\x30\x82 not a certificate")
    elif case == "cert alone":
        args = args[:2]
    data_dir = tmp_path / "hub"
    done = run_cli("hub", "init", "--data-dir", str(data_dir), *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert code in done.stderr and text in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not data_dir.exists()
