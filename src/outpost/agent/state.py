"""The agent's state directory: machine key, identity, cache, pidfile and status socket.

Cached files are written atomically (a temporary file, fsync, rename) with a SHA-256 of their
content, so a torn or corrupted file is detected instead of being trusted (HW-9). The files
fall in three kinds:

- ``machine.key``: the private key. It never leaves the machine, so nothing can restore it.
- ``identity.json``: what the hub cannot tell the agent (its machine id, the hub URLs, the
  pinned CA's fingerprint). Rebuilt from ``registration.json`` when that is intact.
- the cache (``registration.json``, ``hub.json``): everything the hub can send again. A
  corrupt cache file is moved aside as ``NAME.corrupt-TIMESTAMP`` and fetched again.
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


# The fields of a registration the hub cannot send again (see the module docstring).
IDENTITY_FIELDS = ("machine_id", "account_id", "name", "group", "hub_urls", "ca_fingerprint",
                   "registered_at")
# The files the hub can send again: removed by ``reset-cache``, healed when corrupt.
CACHE_FILES = ("registration.json", "hub.json")


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
    def identity_path(self) -> Path:
        return self.root / "identity.json"

    @property
    def hub_cache_path(self) -> Path:
        return self.root / "hub.json"

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

    def keep_private(self) -> None:
        """Mode 0700, whoever made the directory: runbooks run as other users (sandbox.py)
        and must not read the key, the identity, the config or the spool in it."""
        try:
            if os.stat(self.root).st_uid == os.geteuid():
                os.chmod(self.root, 0o700)
        except OSError:
            pass

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
        """Write the registration cache, and the identity when it is missing or differs."""
        self.ensure()
        write_checked(self.registration_path, reg.to_dict())
        wanted = {name: getattr(reg, name) for name in IDENTITY_FIELDS}
        try:
            current = self.identity()
        except CorruptFile:
            current = None
        if current != wanted:
            write_checked(self.identity_path, wanted)

    def identity(self) -> dict[str, Any] | None:
        """The identity (IDENTITY_FIELDS), None when absent; raises CorruptFile."""
        if not self.identity_path.exists():
            return None
        data = read_checked(self.identity_path)
        if set(data) != set(IDENTITY_FIELDS):
            raise CorruptFile(f"{self.identity_path}: fields {sorted(data)} are not an identity")
        return data

    def clear_registration(self) -> None:
        for path in (self.registration_path, self.identity_path, self.hub_cache_path,
                     self.key_path):
            path.unlink(missing_ok=True)

    # --- the cache (HW-9) ----------------------------------------------------------------
    def hub_cache(self) -> dict[str, Any] | None:
        """What the hub last said in a heartbeat answer (hub.json); raises CorruptFile."""
        if not self.hub_cache_path.exists():
            return None
        return read_checked(self.hub_cache_path)

    def save_hub_cache(self, data: dict[str, Any]) -> None:
        self.ensure()
        write_checked(self.hub_cache_path, data)

    def quarantine(self, path: Path) -> Path:
        """Move a corrupt file aside as ``NAME.corrupt-TIMESTAMP``; returns the new path."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = path.with_name(f"{path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        os.replace(path, target)
        return target

    def _condition(self, name: str) -> tuple[str, str]:
        path = self.root / name
        if not path.exists():
            return "missing", "absent"
        try:
            if name == "machine.key":
                self.load_key()
            elif name == "identity.json":
                self.identity()
            elif name == "registration.json":
                self.registration()
            else:
                read_checked(path)
        except CorruptFile as exc:
            return "corrupt", str(exc)
        except OutpostError as exc:
            return "corrupt", exc.message
        except OSError as exc:
            return "corrupt", f"{path}: cannot be read: {exc}"
        return "ok", "checksum verified" if name != "machine.key" else "a well-formed key"

    def cache_report(self) -> list[dict[str, Any]]:
        """Each file of the agent's state with its condition, for ``outpost check`` (HW-9).

        One dict per file: ``name``, ``path``, ``kind`` (``key``, ``identity`` or ``cache``),
        ``state`` (``ok``, ``corrupt`` or ``missing``), ``detail``, and ``refetchable``:
        whether the agent fetches or rebuilds it by itself. A missing ``hub.json`` before
        the first heartbeat, or a missing registration with its identity intact, is normal.
        """
        files = (("machine.key", "key", False), ("identity.json", "identity", True),
                 ("registration.json", "cache", True), ("hub.json", "cache", True))
        report = []
        for name, kind, refetchable in files:
            state, detail = self._condition(name)
            report.append({"name": name, "path": str(self.root / name), "kind": kind,
                           "state": state, "detail": detail, "refetchable": refetchable})
        return report

    def corrupt_copies(self) -> list[Path]:
        """Files moved aside as corrupt (``NAME.corrupt-TIMESTAMP``), by name and time."""
        if not self.root.is_dir():
            return []
        return sorted(self.root.glob("*.corrupt-*"))

    def clear_cache(self) -> list[Path]:
        """Remove the cache files (never the key or the identity); returns what it removed.

        The identity is written first from the registration when it is missing, so that an
        older state directory keeps what the hub cannot send again. Raises CorruptFile when
        neither the identity nor the registration is intact: then nothing is removed.
        """
        try:
            identity = self.identity()
        except CorruptFile:
            identity = None
        if identity is None:
            reg = self.registration()  # raises CorruptFile: nothing to keep the identity from
            if reg is not None:
                self.save_registration(reg)
        removed = []
        for name in CACHE_FILES:
            path = self.root / name
            if path.exists():
                path.unlink()
                removed.append(path)
        return removed

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
        self.stopfile.unlink(missing_ok=True)

    # --- the last graceful stop ----------------------------------------------------------
    @property
    def stopfile(self) -> Path:
        return self.root / "stopped.json"

    def save_stop(self, at: float, hub_told: str | None) -> None:
        """A graceful stop, and the hub that was told of it (None: none answered)."""
        try:
            atomic_write(self.stopfile, json.dumps({"at": at, "hub_told": hub_told}).encode(),
                         0o644)
        except OSError:
            pass  # only 'outpost check' reads it: a full disk must not fail the stop

    def last_stop(self) -> dict[str, Any] | None:
        """The last graceful stop, if the agent has not started since."""
        try:
            data = json.loads(self.stopfile.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and isinstance(data.get("at"), (int, float)) \
            else None

    def remove_pid(self) -> None:
        try:
            if int(self.pidfile.read_text().split()[0]) == os.getpid():
                self.pidfile.unlink()
        except (FileNotFoundError, ValueError, IndexError):
            pass
