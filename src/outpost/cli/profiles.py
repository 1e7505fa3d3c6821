"""Profiles: named hub connections the CLI remembers, as kubectl contexts or gh hosts do.

One YAML file in the user's config directory, ``$XDG_CONFIG_HOME/outpost/profiles.yaml``
(``~/.config/outpost/profiles.yaml`` by default), names the profiles and the current one::

    current: local
    profiles:
      local:
        hub_urls: [https://localhost:8443]
        ca_fingerprint: 3f9a...           # 64 hex digits, the hub's CA pinned
        token_file: credentials/local.token
        data_dir: /home/me/project/.outpost        # the hub's data dir, on its machine
        state_dir: /home/me/project/.outpost/agent # the local agent's state dir

The token is never in that file: it is in ``credentials/NAME.token`` (mode 0600, in a 0700
directory), which the profile names. Files are written whole to a temporary name and renamed,
so a reader never sees half a file.

Which profile a command uses: ``--profile NAME`` (anywhere on the command line), else
``OUTPOST_PROFILE``, else the current one. Explicit flags, the ``OUTPOST_*`` variables and
``--data-dir`` all come before any profile (see ``client.resolve``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from outpost.agent.state import atomic_write
from outpost.protocol import fingerprint
from outpost.protocol.errors import OutpostError, entry
from outpost.protocol.names import nearest

FILE_NAME = "profiles.yaml"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEADER = ("# Outpost CLI profiles: see 'outpost profile --help'. Written by 'outpost up',\n"
           "# 'outpost hub init' and 'outpost profile'. Tokens are kept in credentials/.\n")

# The name chosen on this command line (--profile) or by OUTPOST_PROFILE; set once by main().
_chosen: str | None = None


def config_dir() -> Path:
    """``$XDG_CONFIG_HOME/outpost``, or ``~/.config/outpost``; a relative XDG_CONFIG_HOME is
    ignored, as the XDG Base Directory specification says."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".config"
    return root / "outpost"


def choose(name: str | None) -> None:
    """Select the profile for this command (``--profile``/``OUTPOST_PROFILE``)."""
    global _chosen
    _chosen = name


def chosen() -> str | None:
    return _chosen


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise OutpostError("profile_name_invalid",
                           entry("profile_name_invalid").message.format(name=name), name=name)
    return name


@dataclass
class Profile:
    name: str
    hub_urls: list[str]
    ca_fingerprint: str
    token_file: Path | None = None
    data_dir: Path | None = None
    state_dir: Path | None = None

    @property
    def url(self) -> str:
        return self.hub_urls[0] if self.hub_urls else ""

    def has_token(self) -> bool:
        return self.token_file is not None and self.token_file.is_file()

    def token(self) -> str:
        """The token the profile refers to (read from its 0600 file)."""
        try:
            value = self.token_file.read_text().strip() if self.token_file else ""
        except OSError:
            value = ""
        if not value:
            raise OutpostError("profile_token_missing",
                               entry("profile_token_missing").message.format(name=self.name),
                               profile=self.name, token_file=str(self.token_file or ""))
        return value

    def to_json(self, current: bool = False) -> dict[str, Any]:
        """What 'profile list/show --json' print: never the token, only where it is."""
        return {"name": self.name, "current": current, "hub_urls": list(self.hub_urls),
                "ca_fingerprint": self.ca_fingerprint,
                "token_file": str(self.token_file) if self.token_file else None,
                "token_present": self.has_token(),
                "data_dir": str(self.data_dir) if self.data_dir else None,
                "state_dir": str(self.state_dir) if self.state_dir else None}


def _invalid(path: Path, problem: str) -> OutpostError:
    return OutpostError("profiles_file_invalid", entry("profiles_file_invalid").message.format(
        path=path, problem=problem), path=str(path))


@dataclass
class Profiles:
    """The profiles file of one config directory."""

    root: Path
    current: str | None = None
    profiles: dict[str, Profile] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.root / FILE_NAME

    @classmethod
    def load(cls, root: Path | None = None) -> Profiles:
        root = root or config_dir()
        store = cls(root)
        try:
            text = store.path.read_text()
        except FileNotFoundError:
            return store
        except OSError as exc:
            raise _invalid(store.path, exc.strerror or str(exc)) from exc
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise _invalid(store.path, f"not valid YAML ({exc})") from exc
        if not isinstance(raw, dict) or not isinstance(raw.get("profiles") or {}, dict):
            raise _invalid(store.path, "expected 'current' and a mapping 'profiles'")
        for name, item in (raw.get("profiles") or {}).items():
            if not isinstance(item, dict):
                raise _invalid(store.path, f"profile '{name}' is not a mapping")
            urls = item.get("hub_urls") or []
            if isinstance(urls, str):
                urls = [urls]
            store.profiles[str(name)] = Profile(
                name=str(name), hub_urls=[str(u) for u in urls],
                ca_fingerprint=str(item.get("ca_fingerprint") or ""),
                token_file=store._path(item.get("token_file")),
                data_dir=store._path(item.get("data_dir")),
                state_dir=store._path(item.get("state_dir")))
        current = raw.get("current")
        store.current = str(current) if current else None
        return store

    def _path(self, value: Any) -> Path | None:
        # Relative paths (the token files) are relative to the config directory.
        return self.root / str(value) if value else None

    def _relative(self, path: Path | None) -> str | None:
        if path is None:
            return None
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    def save(self) -> None:
        data = {"current": self.current, "profiles": {
            p.name: {k: v for k, v in {
                "hub_urls": p.hub_urls, "ca_fingerprint": p.ca_fingerprint,
                "token_file": self._relative(p.token_file),
                "data_dir": str(p.data_dir) if p.data_dir else None,
                "state_dir": str(p.state_dir) if p.state_dir else None}.items()
                if v is not None} for p in self.profiles.values()}}
        _private_dir(self.root)
        _write(self.path, _HEADER + yaml.safe_dump(data, sort_keys=False), 0o600)

    def get(self, name: str) -> Profile:
        """The profile ``name``; E8002, with a "did you mean" when a name is close."""
        if name in self.profiles:
            return self.profiles[name]
        close = nearest(name, self.profiles)
        message = entry("profile_unknown").message.format(name=name)
        if close:
            message += f" Did you mean '{close}'?"
        names = ", ".join(sorted(self.profiles))
        fix = (f"Pick one of: {names} ('outpost profile list' shows them)." if names else
               "There are no profiles yet: 'outpost up' or 'outpost hub init' writes one.")
        raise OutpostError("profile_unknown", message, fix=fix, name=name,
                           did_you_mean=close[0] if close else None)

    def put(self, profile: Profile, token: str | None = None, make_current: bool = True
            ) -> Profile:
        """Add or replace ``profile``, keeping ``token`` in its credentials file."""
        check_name(profile.name)
        profile.ca_fingerprint = fingerprint.parse(profile.ca_fingerprint)
        if token is not None:
            creds = self.root / "credentials"
            _private_dir(self.root)
            _private_dir(creds)
            profile.token_file = creds / f"{profile.name}.token"
            _write(profile.token_file, token.strip() + "\n", 0o600)
        self.profiles[profile.name] = profile
        if make_current:
            self.current = profile.name
        self.save()
        return profile

    def remove(self, name: str) -> tuple[Profile, bool]:
        """Remove ``name`` and its token file; whether it was the current one."""
        profile = self.get(name)
        del self.profiles[name]
        was_current = self.current == name
        if was_current:
            self.current = None
        self.save()
        if profile.token_file is not None and \
                profile.token_file.parent == self.root / "credentials":
            profile.token_file.unlink(missing_ok=True)
        return profile, was_current

    def selected_name(self) -> str | None:
        return _chosen or self.current

    def active(self) -> Profile | None:
        """The profile this command uses: the chosen one (an unknown name is an error), else
        the current one, else none."""
        if _chosen:
            return self.get(_chosen)
        if self.current and self.current in self.profiles:
            return self.profiles[self.current]
        return None


def active() -> Profile | None:
    return Profiles.load().active()


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)


def _write(path: Path, text: str, mode: int) -> None:
    atomic_write(path, text.encode(), mode)
