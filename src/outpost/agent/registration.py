"""Registering a machine with a hub, and removing the registration (HW-4, HW-7, HW-10, ED-7)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from outpost.protocol import fingerprint as fingerprints
from outpost.protocol import signing
from outpost.protocol.errors import ALREADY_REGISTERED_TEXT, OutpostError, TransportError
from outpost.protocol.models import RegisterResponse

from nacl.signing import SigningKey

from .facts import machine_facts
from .state import CorruptFile, Registration, StateDir
from .transport import Clock, HubClient, fetch_ca

log = logging.getLogger("outpost.agent")


def check_name(name: str) -> None:
    """ED-7: the same rule and text as the hub applies."""
    if not name or len(name) > 64:
        raise OutpostError(
            "invalid_hostname",
            fix="Pass a name of 1 to 64 characters with --name"
                + (" (without --name, the host name is used)." if name else "."),
            name=name, length=len(name),
        )


@dataclass
class RegisterOptions:
    hub: str
    account_id: str
    account_key: str
    group: str
    ca_fingerprint: str
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    force: bool = False
    proxy: str | None = None
    extra_hubs: list[str] = field(default_factory=list)


async def register(state: StateDir, opts: RegisterOptions, clock: Clock) -> Registration:
    check_name(opts.name)
    try:
        key_bytes = signing.unb64(opts.account_key.strip())
        if len(key_bytes) != 32:
            raise ValueError("wrong length")
    except ValueError as exc:
        raise OutpostError("account_key_invalid") from exc
    fingerprint = fingerprints.parse(opts.ca_fingerprint)
    try:
        existing = state.registration()
    except CorruptFile:
        existing = None
    try:
        # After 'reset-cache' only the identity is left; it still holds a registration.
        held = existing.to_dict() if existing is not None else state.identity()
    except CorruptFile:
        held = None
    if held is not None and not opts.force:
        raise OutpostError(
            "already_registered",
            f"{ALREADY_REGISTERED_TEXT}: this machine is registered as '{held['name']}' in "
            f"account {held['account_id']}, group '{held['group']}' (state dir {state.root}).",
            account_id=held["account_id"], group=held["group"], name=held["name"],
        )
    urls = list(dict.fromkeys([opts.hub, *opts.extra_hubs]))
    ca_pem = await _first_ca(urls, fingerprint, opts.proxy)
    # The new key and registration are written only once the hub has accepted them, so a
    # refused attempt leaves the state directory as it was.
    key = SigningKey.generate()
    public = bytes(key.verify_key)
    request = {"name": opts.name, "group": opts.group, "labels": opts.labels,
               "public_key": signing.b64(public), "facts": machine_facts(),
               "force": opts.force}
    client = HubClient(urls, ca_pem, clock=clock, proxy=opts.proxy,
                       ca_fingerprint=fingerprint)
    try:
        answer = RegisterResponse.model_validate(await client.request(
            "POST", "/v1/agent/register", request, account=(opts.account_id, key_bytes)))
    finally:
        await client.aclose()
    if existing is not None and existing.machine_id != answer.machine_id \
            and existing.name != answer.name:
        # Replaced under another name: the hub still holds the old machine (under the same
        # name, --force already replaced it there).
        await _forget_at_hub(state, existing, clock, opts.proxy)
    state.save_key(key)
    reg = Registration(
        machine_id=answer.machine_id, account_id=answer.account_id, name=answer.name,
        group=answer.group, hub_urls=urls, ca_pem=ca_pem,
        ca_fingerprint=fingerprint, labels=opts.labels, registered_at=time.time(),
    )
    state.save_registration(reg)
    return reg


async def _first_ca(urls: list[str], fingerprint: str, proxy: str | None) -> str:
    """The pinned CA from the first hub URL that answers (ED-4); the last failure if none."""
    last: TransportError | None = None
    for url in urls:
        try:
            return await fetch_ca(url, fingerprint, proxy)
        except TransportError as exc:
            log.warning("hub %s unreachable (%s): %s", url, exc.kind, exc.message)
            last = exc
    assert last is not None
    raise last


def client_for(state: StateDir, reg: Registration, clock: Clock, proxy: str | None = None,
               urls: list[str] | None = None, timeout: float = 15.0,
               connections: int = 4) -> HubClient:
    return HubClient(urls or reg.hub_urls, reg.ca_pem, clock=clock, proxy=proxy,
                     timeout=timeout, connections=connections, machine_id=reg.machine_id,
                     machine_key=state.load_key(),
                     ca_fingerprint=reg.ca_fingerprint)


async def _forget_at_hub(state: StateDir, reg: Registration, clock: Clock,
                         proxy: str | None) -> bool:
    try:
        client = client_for(state, reg, clock, proxy)
    except OutpostError:
        return False
    try:
        await client.request("POST", "/v1/agent/deregister", {})
        return True
    except OutpostError as exc:
        log.warning("the hub did not remove the old registration: %s", exc.message)
        return False
    finally:
        await client.aclose()


async def deregister(state: StateDir, clock: Clock, proxy: str | None = None) -> tuple[
        Registration, bool]:
    """Remove the registration on the hub and here; (what it was, whether the hub agreed)."""
    reg = state.registration()
    if reg is None:
        raise OutpostError("not_registered", f"No registration in {state.root}.")
    at_hub = await _forget_at_hub(state, reg, clock, proxy)
    state.clear_registration()
    return reg, at_hub
