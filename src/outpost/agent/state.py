"""The agent's state directory: machine key, registration, pidfile and status socket.

Cached files are written atomically (a temporary file, fsync, rename) with a SHA-256 of their
content, so a torn or corrupted file is detected instead of being trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from outpost.protocol.errors import OutpostError
from outpost.protocol.signing import b64, unb64

KEY_HEADER = "-----BEGIN OUTPOST ED25519 SEED-----"
KEY_FOOTER = "-----END OUTPOST ED25519 SEED-----"


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/outpost")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "outpost"


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _not_outpost(pid: int) -> bool:
    """Whether process ``pid`` is certainly not an Outpost agent (its command line does not
    mention outpost); False when that cannot be seen. Start times are not compared: a clock
    set at boot (no RTC) would move them."""
    import psutil

    try:
        return not any("outpost" in arg for arg in psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


class CorruptFile(Exception):
    """A cached file failed its checksum or did not parse."""


def write_checked(path: Path, data: dict[str, Any]) -> None:
    body = json.dumps(data, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(body.encode()).hexdigest()
    atomic_write(path, json.dumps({"sha256": digest, "data": data}, indent=1).encode())


def read_checked(path: Path) -> dict[str, Any]:
    try:
        wrapper = json.loads(path.read_bytes())
        data = wrapper["data"]
        body = json.dumps(data, sort_keys=True, separators=(",", ":"))
        if hashlib.sha256(body.encode()).hexdigest() != wrapper["sha256"]:
            raise CorruptFile(f"{path}: checksum mismatch")
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptFile(f"{path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CorruptFile(f"{path}: not a mapping")
    return data


@dataclass
class Registration:
    machine_id: str
    account_id: str
    name: str
    group: str
    hub_urls: list[str]
    ca_pem: str
    ca_fingerprint: str
    labels: dict[str, str]
    registered_at: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class StateDir:
    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def key_path(self) -> Path:
        return self.root / "machine.key"

    @property
    def registration_path(self) -> Path:
        return self.root / "registration.json"

    @property
    def pidfile(self) -> Path:
        return self.root / "agent.pid"

    @property
    def log_path(self) -> Path:
        return self.root / "agent.log"

    @property
    def socket_address(self) -> str:
        """The status socket: in the state dir, or an abstract name if that path is too long
        for a Unix socket (108 bytes on Linux)."""
        path = str(self.root.resolve() / "agent.sock")
        if len(path.encode()) < 100:
            return path
        return "\0outpost-" + hashlib.sha256(path.encode()).hexdigest()[:24]

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    # --- machine key ---------------------------------------------------------------------
    def new_key(self) -> SigningKey:
        """A new Ed25519 key, stored as its 32-byte seed (mode 0600)."""
        key = SigningKey.generate()
        self.save_key(key)
        return key

    def save_key(self, key: SigningKey) -> None:
        self.ensure()
        atomic_write(self.key_path,
                     f"{KEY_HEADER}\n{b64(bytes(key))}\n{KEY_FOOTER}\n".encode())

    def load_key(self) -> SigningKey:
        try:
            lines = [ln.strip() for ln in self.key_path.read_text().splitlines() if ln.strip()]
        except FileNotFoundError as exc:
            raise OutpostError("not_registered", f"No machine key in {self.root}.") from exc
        except (OSError, UnicodeDecodeError):  # unreadable counts as corrupt, below
            lines = []
        try:
            if len(lines) != 3 or lines[0] != KEY_HEADER or lines[2] != KEY_FOOTER:
                raise ValueError("not a machine key file")
            seed = unb64(lines[1])
            if len(seed) != 32:
                raise ValueError("wrong length")
        except ValueError as exc:
            raise OutpostError(
                "machine_key_corrupt",
                f"The machine key {self.key_path} is corrupt; it cannot be fetched again "
                f"because it never leaves this machine.",
                fix="Register this machine again with 'outpost agent register ... --force'.",
            ) from exc
        return SigningKey(seed)

    # --- registration --------------------------------------------------------------------
    def registration(self) -> Registration | None:
        if not self.registration_path.exists():
            return None
        try:
            return Registration(**read_checked(self.registration_path))
        except TypeError as exc:
            raise CorruptFile(f"{self.registration_path}: {exc}") from exc

    def save_registration(self, reg: Registration) -> None:
        self.ensure()
        write_checked(self.registration_path, reg.to_dict())

    def clear_registration(self) -> None:
        for path in (self.registration_path, self.key_path):
            path.unlink(missing_ok=True)

    # --- pidfile -------------------------------------------------------------------------
    def running_pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None
        if pid <= 0:  # os.kill(0 or -1, 0) would "find" this process group or every process
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        if _not_outpost(pid):
            return None  # a stale pidfile whose pid now belongs to another program
        return pid

    def write_pid(self) -> None:
        atomic_write(self.pidfile, f"{os.getpid()} {time.time()}\n".encode(), 0o644)

    def remove_pid(self) -> None:
        try:
            if int(self.pidfile.read_text().split()[0]) == os.getpid():
                self.pidfile.unlink()
        except (FileNotFoundError, ValueError, IndexError):
            pass
