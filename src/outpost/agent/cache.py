"""The agent's cache that heals itself (HW-9).

A corrupt or truncated cache file is moved aside as ``NAME.corrupt-TIMESTAMP``, fetched again
from the hub (or rebuilt from what the running agent holds), and the agent says so in its
log with a warning; heartbeats go on. The running agent looks at its files after every
acknowledged heartbeat, but reads one only when its size, time or inode changed, so an idle
agent costs four ``stat`` calls per heartbeat.

What can be healed, and from where:

- ``registration.json``: ``GET /v1/agent/registration`` (signed), and the CA from
  ``GET /v1/ca`` checked against the pinned fingerprint in ``identity.json``.
- ``identity.json``: from ``registration.json`` (the two hold the identity twice).
- ``hub.json``: from the next heartbeat answer.
- ``machine.key``: never from the hub (the key never leaves the machine). A running agent
  writes back the key it holds in memory; an agent that starts with a corrupt key refuses
  with E1013 and says how to register again.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from outpost.protocol.errors import OutpostError, TransportError

from .state import IDENTITY_FIELDS, CorruptFile, Registration, StateDir
from .transport import Clock, HubClient, fetch_ca

log = logging.getLogger("outpost.agent")


def identity_of(reg: Registration) -> dict[str, Any]:
    return {name: getattr(reg, name) for name in IDENTITY_FIELDS}


def _set_aside(state: StateDir, path: Path, why: str, then: str) -> None:
    moved = state.quarantine(path)
    log.warning("cache file %s is corrupt (%s); moved it aside as %s; %s", path.name, why,
                moved.name, then)


def load_at_start(state: StateDir) -> tuple[Registration | None, dict[str, Any]]:
    """The registration if it is intact, and the identity; corrupt files are set aside.

    A registration of None means it must be fetched from the hub with the identity. Raises
    ``not_registered`` when there is neither, and ``registration_corrupt`` when the
    identity is lost with it: then only registering again helps.
    """
    reg: Registration | None = None
    lost: list[str] = []
    try:
        reg = state.registration()
    except CorruptFile as exc:
        _set_aside(state, state.registration_path, str(exc),
                   "fetching it again from the hub")
        lost.append(state.registration_path.name)
    try:
        identity = state.identity()
    except CorruptFile as exc:
        _set_aside(state, state.identity_path, str(exc),
                   "rebuilding it from registration.json" if reg else "cannot rebuild it")
        lost.append(state.identity_path.name)
        identity = None
    if reg is not None:
        if identity != identity_of(reg):
            state.save_registration(reg)  # writes identity.json (also for older state dirs)
        return reg, identity_of(reg)
    if identity is not None:
        return None, identity
    if lost:
        raise OutpostError(
            "registration_corrupt",
            f"The registration in {state.root} is corrupt ({' and '.join(lost)}; moved aside "
            f"as .corrupt-* files) and nothing else on this machine holds its identity, so "
            f"the agent cannot fetch it again.",
            fix="Register this machine again: 'outpost agent register ... --force "
                f"--state-dir {state.root}'.", state_dir=str(state.root))
    raise OutpostError("not_registered", f"No registration in {state.root}.")


def _registration(identity: dict[str, Any], answer: dict[str, Any],
                  ca_pem: str) -> Registration:
    if answer.get("machine_id") != identity["machine_id"]:
        raise OutpostError("machine_unknown", f"The hub answered for machine "
                           f"{answer.get('machine_id')}, not {identity['machine_id']}.")
    return Registration(
        machine_id=identity["machine_id"], account_id=str(answer["account_id"]),
        name=str(answer["name"]), group=str(answer["group"]), hub_urls=identity["hub_urls"],
        ca_pem=ca_pem, ca_fingerprint=identity["ca_fingerprint"],
        labels=dict(answer.get("labels") or {}), registered_at=identity["registered_at"])


async def fetch_registration(identity: dict[str, Any], key: SigningKey, clock: Clock,
                             urls: list[str], proxy: str | None = None,
                             timeout: float = 15.0) -> Registration:
    """The registration fetched again from the first hub URL that answers, in order.

    Each URL that fails is logged with its kind of failure; the last failure is raised.
    """
    last: OutpostError | None = None
    for url in urls:
        try:
            ca_pem = await fetch_ca(url, identity["ca_fingerprint"], proxy, timeout)
            client = HubClient([url], ca_pem, clock=clock, proxy=proxy, timeout=timeout,
                               machine_id=identity["machine_id"], machine_key=key,
                               ca_fingerprint=identity["ca_fingerprint"], connections=1)
            try:
                answer = await client.request("GET", "/v1/agent/registration")
            finally:
                await client.aclose()
        except TransportError as exc:
            log.warning("fetching the registration from %s failed: hub unreachable (%s): %s",
                        url, exc.kind, exc.message)
            last = exc
            continue
        return _registration(identity, answer, ca_pem)
    assert last is not None
    raise last


class Cache:
    """Watches the running agent's cached files and heals the ones that go bad."""

    def __init__(self, state: StateDir, key: SigningKey, reg: Registration) -> None:
        self.state = state
        self.key = key
        self.reg = reg
        self._seen: dict[str, tuple[int, int, int] | None] = {}
        self._hub: dict[str, Any] | None = None
        try:
            self._hub = state.hub_cache()
        except CorruptFile as exc:
            _set_aside(state, state.hub_cache_path, str(exc),
                       "the next heartbeat answer writes it again")
        for path in self._paths():
            self._note(path)

    def _paths(self) -> tuple[Path, ...]:
        s = self.state
        return (s.key_path, s.identity_path, s.registration_path, s.hub_cache_path)

    @staticmethod
    def _stat(path: Path) -> tuple[int, int, int] | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _note(self, path: Path) -> None:
        self._seen[path.name] = self._stat(path)

    @property
    def last_hub_url(self) -> str | None:
        """The hub URL that answered the last heartbeat before this start (hub.json)."""
        url = (self._hub or {}).get("hub_url")
        return url if isinstance(url, str) else None

    async def check(self, client: HubClient, ack: dict[str, Any]) -> None:
        """After an acknowledged heartbeat: heal what changed on disk and went bad, and
        keep hub.json up to date with the hub's answer."""
        s = self.state
        for path in self._paths():
            now = self._stat(path)
            if now == self._seen.get(path.name) and (now is not None or path in (
                    s.key_path, s.identity_path)):
                continue  # unchanged; or a key or identity removed on purpose, already said
            try:
                if now is None and path in (s.key_path, s.identity_path):
                    # Removed, not corrupt: 'agent deregister' does that. Nothing is
                    # written back, so a deregistered machine stays deregistered.
                    log.warning("%s was removed while the agent runs; it goes on with what "
                                "it holds in memory, but will not start again without it",
                                path.name)
                elif path == s.key_path:
                    self._check_key()
                elif path == s.identity_path:
                    self._check_identity()
                elif path == s.registration_path:
                    await self._check_registration(client)
                elif now is not None:
                    self._check_hub_cache()
            except OSError as exc:
                log.error("could not heal %s: %s", path, exc)
            self._note(path)
        self._remember(client.url, ack)

    def _check_key(self) -> None:
        try:
            on_disk = self.state.load_key()
        except OutpostError as exc:
            _set_aside(self.state, self.state.key_path, exc.message,
                       "writing back the key this running agent holds in memory")
            self.state.save_key(self.key)
            log.warning("E1013 machine_key_corrupt: the hub cannot send the machine key "
                        "again; this running agent restored it from memory. Had the agent "
                        "been stopped, only 'outpost agent register ... --force' would have "
                        "helped.")
            return
        if on_disk.encode() != self.key.encode():
            # A valid key, but not the one this agent signs with: the state directory was
            # registered again; the running agent leaves it be.
            log.warning("machine.key changed on disk while the agent runs; restart the agent "
                        "to use the new registration")

    def _check_hub_cache(self) -> None:
        try:
            self._hub = self.state.hub_cache()
        except CorruptFile as exc:
            _set_aside(self.state, self.state.hub_cache_path, str(exc),
                       "writing it again from this heartbeat's answer")
            self._hub = None

    def _check_identity(self) -> None:
        try:
            if self.state.identity() == identity_of(self.reg):
                return
            why = "it differs from the registration"
        except CorruptFile as exc:
            why = str(exc)
        _set_aside(self.state, self.state.identity_path, why,
                   "rebuilding it from the registration")
        self.state.save_registration(self.reg)

    async def _check_registration(self, client: HubClient) -> None:
        try:
            if self.state.registration() is not None:
                return
            log.warning("cache file registration.json is missing; fetching it again from "
                        "the hub")
        except CorruptFile as exc:
            _set_aside(self.state, self.state.registration_path, str(exc),
                       "fetching it again from the hub")
        try:
            answer = await client.request("GET", "/v1/agent/registration")
            reg = _registration(identity_of(self.reg), answer, self.reg.ca_pem)
        except OutpostError as exc:
            # The next heartbeat tries again: the file is missing now, which _check notices.
            log.warning("fetching registration.json again failed (%s); trying again after "
                        "the next heartbeat", exc.message)
            return
        self.state.save_registration(reg)
        self.reg = reg
        log.warning("registration.json fetched again from %s and written (checksum %s)",
                    client.url, "verified" if self.state.registration() == reg else "FAILED")

    def _remember(self, url: str, ack: dict[str, Any]) -> None:
        """hub.json: written when what it holds changes, not on every heartbeat."""
        wanted = {"hub_url": url, "machine_id": ack.get("machine_id"),
                  "min_agent_version": ack.get("min_agent_version")}
        if self._hub is not None and {k: self._hub.get(k) for k in wanted} == wanted \
                and self.state.hub_cache_path.exists():
            return
        offset = ack.get("hub_time")
        data = {**wanted, "written_at": time.time(),
                "hub_clock_offset": round(float(offset) - time.time(), 3)
                if isinstance(offset, (int, float)) else None}
        self.state.save_hub_cache(data)
        self._hub = data
        self._note(self.state.hub_cache_path)
