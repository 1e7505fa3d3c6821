"""The hub's data directory: its layout, its config file, and ``outpost hub init``."""

from __future__ import annotations

import os
import secrets
import ssl
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from outpost.protocol.errors import OutpostError
from outpost.protocol.signing import b64

from . import pki
from .vault import Vault, new_account_key, new_token, token_hash

DEFAULT_BIND = "127.0.0.1:8443"


KIB = 1024
MIB = 1024 * KIB


class BodyLimits(BaseModel):
    """The largest request body each kind of route takes, in bytes; a larger one is refused
    with 413 before it is read (see hub/edge.py and docs/hub.md)."""

    model_config = ConfigDict(extra="forbid")

    registration: int = Field(default=64 * KIB, ge=4 * KIB, description=(
        "POST /v1/agent/register, and routes that take no body"))
    operator: int = Field(default=2 * MIB, ge=64 * KIB, description=(
        "operator writes: runbooks (their content at most 1 MiB), jobs, assets, schedules"))
    agent: int = Field(default=1 * MIB, ge=64 * KIB, description=(
        "an agent's heartbeats, polls and other requests"))
    reports: int = Field(default=8 * MIB, ge=1 * MIB, description=(
        "an agent's job reports (it sends about 1 MiB at a time, a record at most 1 MiB)"))
    report_records: int = Field(default=20_000, ge=1000, description=(
        "output records in one reports request"))
    messages: int = Field(default=4 * MIB, ge=256 * KIB, description=(
        "an agent's batch of upstream messages (bodies in base64)"))


class MessageForward(BaseModel):
    """Where stored upstream messages are published (hub/messages.py, docs/messages.md): a
    NATS server or an MQTT 5 broker, one of the two."""

    model_config = ConfigDict(extra="forbid")

    nats: str | None = Field(
        default=None, pattern=r"^(nats|tls)://[A-Za-z0-9._\-\[\]:]+:[0-9]{1,5}$",
        description="A NATS server, nats://HOST:PORT (TLS when the server asks for it) or "
        "tls://HOST:PORT (TLS required); no credentials in it: see username, password_file")
    mqtt: str | None = Field(
        default=None, pattern=r"^mqtts?://[A-Za-z0-9._\-\[\]:]+:[0-9]{1,5}$",
        description="An MQTT 5 broker, mqtt://HOST:PORT or mqtts://HOST:PORT (TLS); no "
        "credentials in it: see username, password_file")
    username: str | None = Field(default=None, min_length=1, max_length=256, description=(
        "The user the hub connects as (with password_file)"))
    password_file: Path | None = Field(default=None, description=(
        "A file holding the password (or, for NATS without username, the token), read at "
        "each connection: never in hub.yaml, the URL or a log"))
    ca_file: Path | None = Field(default=None, description=(
        "PEM certificates that the broker's TLS certificate must chain to (default: the "
        "system's trusted ones)"))
    server_name: str | None = Field(default=None, min_length=1, max_length=253, description=(
        "The name the broker's certificate must carry (default: the URL's host)"))

    @field_validator("password_file", "ca_file")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a file (give the path of an existing file, "
                             "readable by the hub)")
        return value

    subject: str = Field(default="outpost.{machine}.{module}.{output}", min_length=1,
                         max_length=200, pattern=r"^[^\s*>]+$", description=(
        "NATS: the subject of each message; {machine}, {module} and {output} are replaced"))
    topic: str = Field(default="outpost/{machine}/{module}/{output}", min_length=1,
                       max_length=200, pattern=r"^[^+#\x00]+$", description=(
        "MQTT: the topic of each message; {machine}, {module} and {output} are replaced"))

    @field_validator("subject", "topic")
    @classmethod
    def _known_fields(cls, value: str) -> str:
        try:
            value.format(machine="m", module="a", output="o")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"it may name only {{machine}}, {{module}} and {{output}} "
                             f"({exc!r})") from None
        return value

    @model_validator(mode="after")
    def _one(self) -> MessageForward:
        if (self.nats is None) == (self.mqtt is None):
            raise ValueError("give one of 'nats' and 'mqtt'")
        if self.username is not None and self.password_file is None:
            raise ValueError("'username' needs 'password_file' (the file with its password)")
        if (self.ca_file or self.server_name) and not self.tls:
            raise ValueError("'ca_file' and 'server_name' are for TLS: use tls://HOST:PORT "
                             "(NATS) or mqtts://HOST:PORT (MQTT)")
        return self

    @property
    def tls(self) -> bool:
        """TLS required by the URL (a nats:// server may still ask for it)."""
        return self.url.startswith(("tls://", "mqtts://"))

    def password(self) -> str | None:
        """The password file's text (its last line break dropped), read now."""
        if self.password_file is None:
            return None
        try:
            return self.password_file.read_text().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise OSError(f"cannot read password_file {self.password_file}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None

    def tls_context(self) -> ssl.SSLContext:
        """A client context that checks the broker's certificate and name."""
        context = ssl.create_default_context(
            cafile=str(self.ca_file) if self.ca_file is not None else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    @property
    def target(self) -> str:
        """'nats' or 'mqtt': also the name of the forwarder's cursor in the database."""
        return "nats" if self.nats is not None else "mqtt"

    @property
    def url(self) -> str:
        return str(self.nats or self.mqtt)


class MessagesSettings(BaseModel):
    """Upstream messages at the hub: how long they are kept, and where they are forwarded."""

    model_config = ConfigDict(extra="forbid")

    # Retention: the older or the more numerous are pruned (once across replicas).
    max_age_seconds: float = Field(default=7 * 86400.0, gt=0)
    max_count: int = Field(default=1_000_000, ge=1)
    forward: MessageForward | None = None


class HubConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bind: str = DEFAULT_BIND
    url: str = f"https://{DEFAULT_BIND}"
    database_url: str = ""
    hostnames: list[str] = Field(default_factory=list)
    # HW-5: agents older than this are refused with a plain message.
    min_agent_version: str = "0.1.0"
    heartbeat_interval: float = 30.0
    # Longest time a long-poll is held before it answers with no work.
    poll_timeout: float = 25.0
    log_level: str = "info"
    body_limits: BodyLimits = Field(default_factory=BodyLimits)
    # A certificate chain and key given to 'hub init --tls-cert/--tls-key' for the public
    # listener, used in place of server.pem and server.key; ca.pem then holds the chain's
    # root CA, which agents pin (docs/hub.md, "Your own certificate").
    tls_cert: str = ""
    tls_key: str = ""
    # The bytes each machine's backup repository may hold unless its credential sets its
    # own quota (docs/backup.md); 0 is unlimited.
    backup_quota_bytes: int = Field(default=0, ge=0)
    # Upstream messages from machines' modules (hub/messages.py).
    messages: MessagesSettings = Field(default_factory=MessagesSettings)

    def listener_files(self, paths: HubPaths) -> tuple[Path, Path]:
        """The certificate chain and key the hub serves HTTPS with."""
        if self.tls_cert:
            return Path(self.tls_cert), Path(self.tls_key)
        return paths.server_cert, paths.server_key


@dataclass(frozen=True)
class HubPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "hub.yaml"

    @property
    def database(self) -> Path:
        return self.root / "hub.db"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def master_key(self) -> Path:
        return self.root / "master.key"

    @property
    def admin_token(self) -> Path:
        return self.root / "admin.token"

    @property
    def seed(self) -> Path:
        return self.root / "seed.yaml"

    def initialised(self) -> bool:
        return self.config.exists() and self.master_key.exists()


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def load_config(paths: HubPaths) -> HubConfig:
    if not paths.initialised():
        raise OutpostError(
            "hub_not_initialised",
            f"The hub data directory {paths.root} is not initialised.",
            fix=f"Run 'outpost hub init --data-dir {paths.root}' first.",
        )
    try:
        raw = yaml.safe_load(paths.config.read_text()) or {}
        return HubConfig.model_validate(raw)
    except (yaml.YAMLError, ValidationError) as exc:
        raise OutpostError(
            "config_invalid", f"The hub configuration {paths.config} is invalid: {exc}",
            fix=f"Correct {paths.config}.",
        ) from exc


def vault_for(paths: HubPaths) -> Vault:
    return Vault(paths.master_key.read_bytes())


@dataclass
class InitResult:
    created: bool
    url: str
    ca_fingerprint: str
    account_id: str
    primary_key: str
    secondary_key: str
    admin_token: str

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "ca_fingerprint": self.ca_fingerprint,
            "account_id": self.account_id,
            "primary_key": self.primary_key,
            "secondary_key": self.secondary_key,
            "admin_token": self.admin_token,
        }


def ca_fingerprint(paths: HubPaths) -> str:
    from cryptography import x509

    return pki.fingerprint(x509.load_pem_x509_certificate(paths.ca_cert.read_bytes()))


def read_seed(paths: HubPaths) -> dict[str, Any]:
    """The first account, kept beside the config so any fresh database can be seeded.

    The account keys are sealed by the vault and the admin token is kept only as a hash.
    """
    data: dict[str, Any] = yaml.safe_load(paths.seed.read_text())
    return data


def init(
    root: Path, hostnames: list[str], bind: str = DEFAULT_BIND, database_url: str = "",
    tls_cert: Path | None = None, tls_key: Path | None = None,
) -> InitResult:
    """Create a hub data directory; on one that exists, change nothing and report it.

    With ``tls_cert`` and ``tls_key`` the hub serves that chain (checked first: the key
    matches, the names are covered, the chain ends with a root CA) and ca.pem is its root
    CA; otherwise the hub makes a CA of its own and a server certificate from it.
    """
    paths = HubPaths(root)
    if paths.initialised():
        config = load_config(paths)
        seed = read_seed(paths)
        vault = vault_for(paths)
        return InitResult(
            created=False,
            url=config.url,
            ca_fingerprint=ca_fingerprint(paths),
            account_id=seed["account_id"],
            primary_key=vault.open(seed["primary_key"], "account-key").decode(),
            secondary_key=vault.open(seed["secondary_key"], "account-key").decode(),
            admin_token=paths.admin_token.read_text().strip(),
        )
    host = bind.rsplit(":", 1)[0]
    port = bind.rsplit(":", 1)[1]
    url_host = hostnames[0] if hostnames else ("localhost" if host in ("0.0.0.0", "127.0.0.1",
                                                                       "::", "") else host)
    config = HubConfig(
        bind=bind,
        url=f"https://{url_host}:{port}",
        database_url=database_url or f"sqlite:///{paths.database}",
        hostnames=hostnames,
    )
    root_ca = None
    if tls_cert is not None and tls_key is not None:
        # Checked before anything is written: a refused chain leaves no half-made directory.
        root_ca = pki.provided_chain(tls_cert, tls_key, list(dict.fromkeys(
            [url_host.strip("[]"), *hostnames])))
        config.tls_cert, config.tls_key = str(tls_cert.resolve()), str(tls_key.resolve())
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    if root_ca is not None:
        from cryptography.hazmat.primitives import serialization

        paths.ca_cert.write_bytes(root_ca.public_bytes(serialization.Encoding.PEM))
    else:
        pki.create_ca(f"Outpost hub CA {uuid.uuid4().hex[:8]}", paths.ca_cert, paths.ca_key)
        pki.create_server_cert(paths.ca_cert, paths.ca_key, hostnames, paths.server_cert,
                               paths.server_key)
    _write_private(paths.master_key, secrets.token_bytes(32))
    vault = vault_for(paths)
    account_id = str(uuid.uuid4())
    primary, secondary = new_account_key(), new_account_key()
    admin = new_token()
    _write_private(paths.admin_token, (admin + "\n").encode())
    _write_private(paths.seed, yaml.safe_dump({
        "account_id": account_id,
        "account_name": "default",
        "primary_key": vault.seal(primary.encode(), "account-key"),
        "secondary_key": vault.seal(secondary.encode(), "account-key"),
        "admin_token_hash": token_hash(admin),
        "created_at": time.time(),
    }).encode())
    # Written last: its presence marks the directory as initialised.
    paths.config.write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
    return InitResult(True, config.url, ca_fingerprint(paths), account_id, primary, secondary,
                      admin)


def random_id() -> str:
    return str(uuid.uuid4())


__all__ = ["HubConfig", "HubPaths", "InitResult", "init", "load_config", "b64"]
