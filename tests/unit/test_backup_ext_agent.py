"""The reconciler's credential path, through its one seam to the hub (a fake of
``HubChannel``): a manifest that asks for ``credentials: ["backup"]`` gets them fetched
afresh before each command, on stdin only, redacted from the extension's log; a hub that
does not give them leaves a retry (E9100), not a failed version."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from outpost.agent.transport import TransportError
from tests.extbuild import manifest, package
from tests.support import shared_dir
from tests.unit.test_ext_agent_reconcile import NAME, FakeHub, Machine, converge, in_loop

STATUS = ('printf \'{"status":"success","code":0,"message":"ok"}\' '
          '> "$OUTPOST_EXT_STATUS_DIR/$OUTPOST_EXT_SEQ.status"')


@dataclass
class CredentialHub(FakeHub):
    issued: list[str] = field(default_factory=list)
    refuse: bool = False

    async def fetch_credentials(self, kind: str) -> dict[str, Any]:
        if self.refuse:
            raise TransportError("refused", "https://hub.test", "connection refused")
        token = f"obk_{uuid.uuid4().hex}"
        self.issued.append(token)
        return {"token": token, "hub": "https://hub.test", "machine_id": "m-1",
                "url": "https://hub.test/v1/backup/m-1/", "ca_pem": "PEM", "kind": kind}


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[Machine]:
    """test_ext_agent_reconcile's machine, without a control group (not what is tested)."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    with shared_dir() as shared:
        tree = shared / "tree"
        tree.mkdir(mode=0o711)
        yield Machine(state, tree, shared / "trace", FakeHub(), SigningKey.generate(), None)


def publish(machine: Machine, stdin_copy: Path) -> None:
    body = f"#!/bin/sh\ncat > {stdin_copy}.$OUTPOST_EXT_HANDLER; cat {stdin_copy}." \
           f"$OUTPOST_EXT_HANDLER; echo; {STATUS}\n"
    data = package(manifest(NAME, "1.0.0", credentials=["backup"]), files={
        f"bin/{h}": (body.encode(), 0o755)
        for h in ("install", "enable", "disable", "update", "uninstall")})
    machine.hub.packages[(NAME, "1.0.0")] = data


def with_credentials(machine: Machine) -> CredentialHub:
    hub = CredentialHub()
    machine.hub = hub
    return hub


@in_loop
async def test_credentials_reach_each_command_on_stdin_and_not_the_log(
        machine: Machine) -> None:
    hub = with_credentials(machine)
    copy = machine.trace.with_name("stdin")
    publish(machine, copy)
    await converge(machine, machine.goal("1.0.0", settings={"paths": ["/srv"]},
                                         protected={"repository_password": "pw-secret-1"}))
    assert machine.record().state == "Ready", machine.record().message
    # One fresh token for each command (install, enable), each on that command's stdin.
    assert len(hub.issued) == 2
    for handler_name, token in zip(("install", "enable"), hub.issued, strict=True):
        got = json.loads(Path(f"{copy}.{handler_name}").read_text())
        assert got["credentials"]["backup"]["token"] == token
        assert got["credentials"]["backup"]["machine_id"] == "m-1"
        assert got["protected"] == {"repository_password": "pw-secret-1"}
        Path(f"{copy}.{handler_name}").unlink()
    # The handlers echoed their stdin: the log keeps neither the token nor the password.
    log = (machine.state / "logs" / "extensions" / f"{NAME}.log").read_text()
    assert "[redacted]" in log and '"machine_id": "m-1"' in log  # not a secret
    for secret in [*hub.issued, "pw-secret-1"]:
        assert secret not in log
        for root in (machine.state, machine.tree):
            for path in root.rglob("*"):
                if path.is_file():
                    assert secret.encode() not in path.read_bytes(), path


@in_loop
async def test_a_hub_that_gives_no_credentials_leaves_a_retry(machine: Machine) -> None:
    hub = with_credentials(machine)
    hub.refuse = True
    publish(machine, machine.trace.with_name("stdin"))
    r = await converge(machine, machine.goal("1.0.0"))
    rec = machine.record()
    assert rec.state != "Failed" and rec.message.startswith("E9100:"), rec.message
    assert "backup credentials" in rec.message and "1.0.0" not in rec.failed
    assert r.retry_at is not None  # tried again later, not given up
    hub.refuse = False
    r.retry_at = r.clock() - 1
    r.note_etag(r.store.etag)
    assert r.wake.is_set()


@in_loop
async def test_commands_running_together_share_one_issue(machine: Machine) -> None:
    # Each issue rotates the machine's token, which would cut off a command still using the
    # one before: two extensions' installs, each waiting for the other to have started,
    # hold the same credentials.
    hub = with_credentials(machine)
    seen = machine.trace.with_name("seen")
    seen.mkdir()
    seen.chmod(0o1777)  # the extension user writes there
    for name, other in (("one", "two"), ("two", "one")):
        body = (f"#!/bin/sh\ncat > {seen}/{name}.$OUTPOST_EXT_HANDLER\n"
                f"n=0; while [ ! -f {seen}/{other}.install ] && [ $n -lt 200 ]; do "
                f"sleep 0.05; n=$((n+1)); done\n{STATUS}\n")
        machine.hub.packages[(name, "1.0.0")] = package(
            manifest(name, "1.0.0", credentials=["backup"]), files={
                f"bin/{h}": (body.encode(), 0o755)
                for h in ("install", "enable", "disable", "update", "uninstall")})
    await converge(machine, machine.goal("1.0.0", name="one"),
                   machine.goal("1.0.0", name="two"))
    tokens = {path.name: json.loads(path.read_text())["credentials"]["backup"]["token"]
              for path in seen.iterdir()}
    assert tokens["one.install"] == tokens["two.install"], tokens
    assert tokens["one.install"] == hub.issued[0]
    assert machine.reconciler is not None and machine.reconciler._held == {}
