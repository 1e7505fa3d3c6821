"""Assets: variables, credentials and certificates kept per account for runbooks (HW-2).

Every value is sealed by the vault (AES-GCM under the hub's master key) with the account,
kind and name as associated data, so a sealed value copied onto another row does not open.
Only what a listing shows (kind, name, thumbprint, subject, expiry) is stored in clear.
Operators write assets and read their metadata; only a running job, through its job token
(``job_identity``), reads the values.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from outpost.protocol.errors import CERTIFICATE_MISSING_TEXT, OutpostError

from .config import random_id
from .db import assets
from .vault import Vault

log = logging.getLogger("outpost.hub.assets")

KINDS = ("variable", "credential", "certificate")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
VALUE_LIMIT = 64 * 1024
FILE_LIMIT = 1024 * 1024
# Thumbprints copied from a certificate dialog often carry spaces, colons or an invisible
# left-to-right mark; they are not part of the thumbprint.
_THUMBPRINT_NOISE = re.compile(r"[\s:\u200e\u200f\ufeff]")
_THUMBPRINT_RE = re.compile(r"^[0-9A-Fa-f]{40}$")


def kind_of(text: str) -> str:
    """``variable``, ``credential`` or ``certificate``, from the singular or the plural."""
    kind = text.lower().removesuffix("s")
    if kind not in KINDS:
        raise OutpostError("invalid_request", f"Unknown asset kind '{text}'.",
                           fix="Use variable, credential or certificate.")
    return kind


def check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise OutpostError("invalid_request", f"Invalid asset name '{name}'.",
                           fix="Use 1 to 128 letters, digits, '.', '_' or '-', starting with a "
                               "letter or digit.")


def as_thumbprint(text: str) -> str | None:
    """The upper-case SHA-1 thumbprint ``text`` spells, or None when it is not one."""
    bare = _THUMBPRINT_NOISE.sub("", text)
    return bare.upper() if _THUMBPRINT_RE.match(bare) else None


def _context(account_id: str, kind: str, name: str) -> str:
    return f"asset:{account_id}:{kind}:{name}"


def _check_text(**fields: str | None) -> None:
    # JSON may carry a lone surrogate (\ud800), which is no character and cannot be stored.
    for field, text in fields.items():
        try:
            (text or "").encode()
        except UnicodeEncodeError as exc:
            raise OutpostError("invalid_request", f"The {field} is not valid Unicode (it "
                               f"holds a lone surrogate).", fix=f"Send the {field} as "
                               "valid UTF-8 text.", field=field) from exc


def _check_size(what: str, value: str) -> None:
    size = len(value.encode())
    if size > VALUE_LIMIT:
        raise OutpostError("asset_too_large", f"The {what} is {size} bytes; the hub accepts "
                           f"at most {VALUE_LIMIT}.", size=size, limit=VALUE_LIMIT)


# --- certificates ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Certificate:
    """A certificate read from a PEM or PFX file: the leaf first, then any chain."""

    thumbprint: str
    subject: str
    issuer: str
    not_after: float
    certificate_pem: str
    private_key_pem: str | None


def _spki(public_key: Any) -> bytes:
    data: bytes = public_key.public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return data


def _pem_parts(data: bytes, password: bytes | None) -> tuple[list[x509.Certificate], Any]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise OutpostError("certificate_invalid", "The PEM file holds no readable "
                           "certificate.") from exc
    if b"PRIVATE KEY-----" not in data:
        return certs, None
    try:
        key = serialization.load_pem_private_key(data, password)
    except TypeError as exc:
        if password is None:  # the key is encrypted and no password was given
            raise OutpostError("certificate_password", "The private key in the PEM file is "
                               "encrypted, and no password was given.") from exc
        key = serialization.load_pem_private_key(data, None)  # a password it did not need
    except (ValueError, UnsupportedAlgorithm) as exc:
        if password is not None and "password" in str(exc).lower():
            raise OutpostError("certificate_password") from exc
        raise OutpostError("certificate_invalid", "The private key in the PEM file could "
                           "not be read.") from exc
    return certs, key


def _pfx_parts(data: bytes, password: bytes | None) -> tuple[list[x509.Certificate], Any]:
    try:
        key, cert, chain = pkcs12.load_key_and_certificates(data, password)
    except (ValueError, UnsupportedAlgorithm) as exc:
        # "Invalid password or PKCS12 data": the file is PKCS#12, the password did not open it.
        if "password" in str(exc).lower():
            which = "is wrong" if password else "was not given"
            raise OutpostError("certificate_password", f"The PFX file could not be opened: "
                               f"its password {which}, or the file is damaged.") from exc
        raise OutpostError("certificate_invalid", "The file is neither a PEM certificate "
                           "nor a PFX (PKCS#12) file.") from exc
    if cert is None:
        raise OutpostError("certificate_invalid", "The PFX file holds no certificate.")
    return [cert, *chain], key


def read_certificate(data: bytes, password: bytes | None = None) -> Certificate:
    """Read a PEM file (certificates and an optional private key) or a PFX/PKCS#12 file."""
    if len(data) > FILE_LIMIT:
        raise OutpostError("asset_too_large", f"The certificate file is {len(data)} bytes; "
                           f"the hub accepts at most {FILE_LIMIT}.", size=len(data),
                           limit=FILE_LIMIT)
    if b"-----BEGIN" in data:
        certs, key = _pem_parts(data, password)
    else:
        try:
            certs, key = [x509.load_der_x509_certificate(data)], None
        except ValueError:
            certs, key = _pfx_parts(data, password)
    leaf = certs[0]
    if key is not None:
        mine = [c for c in certs if _spki(c.public_key()) == _spki(key.public_key())]
        if not mine:
            raise OutpostError("certificate_invalid", "The private key does not belong to "
                               "the certificate.")
        leaf = mine[0]
    ordered = [leaf, *(c for c in certs if c is not leaf)]
    key_pem = None if key is None else key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()
    return Certificate(
        thumbprint=leaf.fingerprint(hashes.SHA1()).hex().upper(),  # as Windows shows it
        subject=leaf.subject.rfc4514_string(), issuer=leaf.issuer.rfc4514_string(),
        not_after=leaf.not_valid_after_utc.timestamp(),
        certificate_pem="".join(c.public_bytes(serialization.Encoding.PEM).decode()
                                for c in ordered),
        private_key_pem=key_pem)


# --- storage --------------------------------------------------------------------------------

async def _store(engine: AsyncEngine, vault: Vault, account_id: str, kind: str, name: str,
                 sealed: dict[str, Any], **columns: Any) -> dict[str, Any]:
    """Create or replace one asset; the value is sealed before it reaches the database."""
    check_name(name)
    value = vault.seal(json.dumps(sealed).encode(), _context(account_id, kind, name))
    now = time.time()
    for _attempt in range(3):  # two writers racing to create the same name
        try:
            async with engine.begin() as conn:
                found = await conn.scalar(sa.select(assets.c.id).where(
                    assets.c.account_id == account_id, assets.c.kind == kind,
                    assets.c.name == name))
                values = {"value": value, "updated_at": now, "secret": False,
                          "description": "", "thumbprint": None, "subject": None,
                          "not_after": None, "has_private_key": False, **columns}
                if found:
                    await conn.execute(assets.update().where(assets.c.id == found)
                                       .values(**values))
                else:
                    await conn.execute(assets.insert().values(
                        id=random_id(), account_id=account_id, kind=kind, name=name,
                        created_at=now, **values))
            break
        except IntegrityError:
            continue
    else:
        raise OutpostError("conflict", f"Could not store {kind} '{name}'; try again.")
    log.info("%s '%s' %s in account %s", kind, name, "replaced" if found else "created",
             account_id)
    return {**await show(engine, account_id, kind, name), "replaced": bool(found)}


async def set_variable(engine: AsyncEngine, vault: Vault, account_id: str, name: str,
                       value: str, *, secret: bool = False,
                       description: str = "") -> dict[str, Any]:
    _check_text(value=value, description=description)
    _check_size("variable's value", value)
    return await _store(engine, vault, account_id, "variable", name, {"value": value},
                        secret=secret, description=description)


async def set_credential(engine: AsyncEngine, vault: Vault, account_id: str, name: str,
                         username: str, secret: str, *,
                         description: str = "") -> dict[str, Any]:
    _check_text(username=username, secret=secret, description=description)
    _check_size("credential", username + secret)
    return await _store(engine, vault, account_id, "credential", name,
                        {"username": username, "secret": secret}, secret=True,
                        description=description)


async def import_certificate(engine: AsyncEngine, vault: Vault, account_id: str, name: str,
                             data: bytes, password: str | None = None, *,
                             description: str = "") -> dict[str, Any]:
    check_name(name)
    _check_text(password=password, description=description)
    cert = read_certificate(data, password.encode() if password is not None else None)
    return await _store(
        engine, vault, account_id, "certificate", name,
        {"certificate": cert.certificate_pem, "private_key": cert.private_key_pem},
        secret=cert.private_key_pem is not None, description=description,
        thumbprint=cert.thumbprint, subject=cert.subject, not_after=cert.not_after,
        has_private_key=cert.private_key_pem is not None)


def _view(row: Any) -> dict[str, Any]:
    return {"kind": row.kind, "name": row.name, "secret": row.secret,
            "description": row.description, "thumbprint": row.thumbprint,
            "subject": row.subject, "not_after": row.not_after,
            "has_private_key": row.has_private_key, "created_at": row.created_at,
            "updated_at": row.updated_at}


async def listing(engine: AsyncEngine, account_id: str) -> list[dict[str, Any]]:
    """Every asset of the account, without values."""
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.select(assets).where(
            assets.c.account_id == account_id).order_by(assets.c.kind, assets.c.name))).all()
    return [_view(r) for r in rows]


def _missing(kind: str, asked: str) -> OutpostError:
    if kind == "certificate":
        thumbprint = as_thumbprint(asked)
        if thumbprint:
            return OutpostError("certificate_not_found",
                                f"{CERTIFICATE_MISSING_TEXT} {thumbprint}",
                                thumbprint=thumbprint)
        return OutpostError("certificate_not_found",
                            f"No certificate was found in the certificate store with name "
                            f"'{asked}'", name=asked)
    return OutpostError("not_found", f"No {kind} '{asked}' in this account.",
                        fix="See 'outpost asset list'.")


async def _find(conn: AsyncConnection, account_id: str, kind: str, asked: str) -> Any:
    """The row of a name, or for a certificate of a name or a thumbprint."""
    mine = sa.select(assets).where(assets.c.account_id == account_id, assets.c.kind == kind)
    row = (await conn.execute(mine.where(assets.c.name == asked))).first()
    thumbprint = as_thumbprint(asked) if kind == "certificate" else None
    if row is None and thumbprint:
        row = (await conn.execute(mine.where(assets.c.thumbprint == thumbprint)
                                  .order_by(assets.c.name).limit(1))).first()
    if row is None:
        raise _missing(kind, asked)
    return row


async def show(engine: AsyncEngine, account_id: str, kind: str, name: str,
               vault: Vault | None = None) -> dict[str, Any]:
    """One asset for an operator: a plain variable's value and a credential's user name
    (when ``vault`` is given), never a secret."""
    async with engine.connect() as conn:
        row = await _find(conn, account_id, kind, name)
    view = _view(row)
    if vault is not None and kind == "variable":
        view["value"] = None if row.secret else _open(vault, account_id, row)["value"]
    elif vault is not None and kind == "credential":
        view["username"] = _open(vault, account_id, row)["username"]
    return view


def _open(vault: Vault, account_id: str, row: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(vault.open(row.value,
                                                 _context(account_id, row.kind, row.name)))
    return data


async def remove(engine: AsyncEngine, account_id: str, kind: str, name: str) -> dict[str, Any]:
    async with engine.begin() as conn:
        row = await _find(conn, account_id, kind, name)
        await conn.execute(assets.delete().where(assets.c.id == row.id))
    log.info("%s '%s' removed from account %s", kind, row.name, account_id)
    return {"kind": kind, "name": row.name, "removed": True}


async def fetch(engine: AsyncEngine, vault: Vault, account_id: str, kind: str,
                asked: str) -> dict[str, Any]:
    """An asset with its value, for a running job of the account."""
    async with engine.connect() as conn:
        row = await _find(conn, account_id, kind, asked)
    opened = _open(vault, account_id, row)
    if kind == "certificate":
        return {"kind": kind, "name": row.name, "thumbprint": row.thumbprint,
                "subject": row.subject, "not_after": row.not_after,
                "certificate": opened["certificate"], "private_key": opened["private_key"]}
    return {"kind": kind, "name": row.name, **opened}

