"""The daemon's side of the modules: what agent/daemon.py starts once the hub names a
deployment for the machine (a heartbeat's ``deployment_etag``) or the state directory
records modules that may still run.

- ``run``: fetches ``GET /v1/agent/deployment`` whenever the etag the hub gives differs from
  the one applied, and applies it; a failed fetch is tried again with backoff (the modules
  keep running as the last deployment said meanwhile).
- ``report_loop``: ``POST /v1/agent/modules/report`` after every change of a module's
  state, batched (at most one a second), sent again after a failure.
- ``control``: a Unix socket in the state directory (``modules/control.sock``, the agent's
  user only) where ``outpost agent restart MODULE`` asks for a module's restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from outpost.protocol.errors import OutpostError
from outpost.protocol.modreaders import wire

from .. import cgroups
from ..transport import HubClient
from . import msghub
from .channel import HttpChannel, ModuleChannel
from .supervisor import TREE, Supervisor

log = logging.getLogger("outpost.agent.modules")

REPORT_EVERY = 1.0  # seconds: at most one report of state changes in this time
REPORT_SETTLE = 0.1  # seconds a first change waits for the changes that come with it
COUNTERS_EVERY = 10.0  # seconds: the message counters are reported at most this often
FETCH_BACKOFF = (1.0, 60.0)  # the first wait after a failed fetch, and its cap
CONTROL = "control.sock"


def control_path(state_root: Path) -> Path:
    return state_root / TREE / CONTROL


class Modules:
    def __init__(self, state_root: Path, client: HubClient | None, *,
                 hierarchy: cgroups.Hierarchy | None = None,
                 defaults: cgroups.Limits | None = None,
                 channel: ModuleChannel | None = None,
                 socket_path: Path | None = None) -> None:
        assert client is not None or channel is not None
        self.state_root = state_root
        self.channel = channel or HttpChannel(client)  # type: ignore[arg-type]
        path = socket_path or msghub.socket_path(state_root)
        self.supervisor = Supervisor(state_root, self.channel, path,
                                     hierarchy=hierarchy, defaults=defaults)
        # The local message hub: it knows a module's process by the supervisor's owner_of,
        # takes each applied deployment's routes, and sends $upstream through the channel.
        self.messages = msghub.MessageHub(self.supervisor.owner_of, state_root, path=path,
                                          adopting=True)
        self.supervisor.on_change.append(self.messages.configure)
        send = getattr(self.channel, "send_messages", None)
        if send is not None:
            self.messages.set_upstream(send)
        self.wanted: str | None = None  # the hub's etag, once a heartbeat gave one
        self.fetched_at: float | None = None
        self.fetch_error: str | None = None
        self._wake = asyncio.Event()
        self._dirty = asyncio.Event()
        self._started = False
        self.supervisor.on_state.append(self._dirty.set)
        # The local message hub's counters (a MessageCounters), for the reports.
        self.counters: Callable[[], Any] | None = self.messages.counters

    def changed(self) -> None:
        """Something to report besides a module's state (the message hub's counters)."""
        self._dirty.set()

    @property
    def poll_etag(self) -> str:
        """The etag the long-poll sends: the hub's last heard, else that of the deployment
        applied ("" for none), so the poll ends when the machine's deployment changes."""
        if self.wanted is not None:
            return self.wanted
        doc = self.supervisor.doc
        return doc.etag if doc is not None else ""

    def note_etag(self, etag: str) -> None:
        """A heartbeat's ``deployment_etag``: fetch when it is not the one applied."""
        self.wanted = etag
        doc = self.supervisor.doc
        if doc is None or doc.etag != etag:
            self._wake.set()

    async def run(self) -> None:
        if not self._started:
            self._started = True
            try:
                await self.messages.start()  # before the modules, which connect at start
            except OutpostError as exc:
                log.error("modules: the message hub is not available (%s %s); the modules "
                          "run without it", exc.code, exc.message)
                self.supervisor.error = f"{exc.code} {exc.message}"
            try:
                await self.supervisor.start()
            finally:
                # Modules that outlived the last agent are known now: hellos that waited
                # for them are told apart (msghub.MessageHub.adopted).
                self.messages.adopted.set()
        wait = FETCH_BACKOFF[0]
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                doc = await self.channel.fetch_deployment()
            except OutpostError as exc:
                self.fetch_error = f"{exc.code} {exc.message}"
                log.warning("modules: could not fetch the deployment (%s); trying again in "
                            "%.0f s", exc.message, wait)
                await asyncio.sleep(wait)
                wait = min(wait * 2, FETCH_BACKOFF[1])
                self._wake.set()
                continue
            wait = FETCH_BACKOFF[0]
            self.fetched_at, self.fetch_error = time.time(), None
            await self.supervisor.apply(doc)
            self._dirty.set()

    async def report_loop(self) -> None:
        wait = FETCH_BACKOFF[0]
        reported: Any = None  # the message counters last reported
        sent = -REPORT_EVERY  # monotonic time of the last report
        while True:
            # A module's change is reported within REPORT_EVERY; the message counters,
            # which change with every message, at most every COUNTERS_EVERY.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), COUNTERS_EVERY)
            counters = self.counters() if self.counters is not None else None
            if not self._dirty.is_set() and counters == reported:
                continue
            # A change after a quiet spell goes out at once (the modules a deployment
            # started together in one report); changes that follow it wait out the rest of
            # REPORT_EVERY, so a module that flaps costs one report a second.
            await asyncio.sleep(max(REPORT_SETTLE, sent + REPORT_EVERY - time.monotonic()))
            sent = time.monotonic()
            self._dirty.clear()
            if self.supervisor.doc is None:
                continue
            try:
                counters = self.counters() if self.counters is not None else None
                reported = counters
                await self.channel.report(self.supervisor.report(counters))
                wait = FETCH_BACKOFF[0]
            except OutpostError as exc:
                log.info("modules: the report was not taken (%s); sent again later",
                         exc.message)
                self._dirty.set()
                await asyncio.sleep(wait)
                wait = min(wait * 2, FETCH_BACKOFF[1])

    async def control(self) -> None:
        path = control_path(self.state_root)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.unlink(missing_ok=True)
        server = await asyncio.start_unix_server(self._answer, path=str(path))
        os.chmod(path, 0o600)
        try:
            await asyncio.Event().wait()
        finally:
            server.close()
            path.unlink(missing_ok=True)

    async def _answer(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            try:
                asked = json.loads(line)
                if not isinstance(asked, dict) or asked.get("op") != "restart":
                    raise ValueError("not a request")
                await self.supervisor.restart(str(asked.get("module", "")))
                answer: dict[str, Any] = {"ok": True}
            except OutpostError as exc:
                answer = {"ok": False, "error": exc.to_body()}
            except ValueError:
                answer = {"ok": False, "error": {"code": "E9172", "message": "not a request"}}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        """The agent stops; its modules do not (docs/modules.md, "On the machine"). They
        lose the message hub until the next agent listens again (their client reconnects);
        what waits to go upstream stays on disk."""
        await self.messages.close()
        await self.supervisor.close()

    def status(self) -> dict[str, Any]:
        doc = self.supervisor.doc
        return {"deployment": doc.deployment if doc else None,
                "version": doc.version if doc else 0, "etag": doc.etag if doc else None,
                "hub_etag": self.wanted, "fetched_at": self.fetched_at,
                "fetch_error": self.fetch_error, "error": self.supervisor.error,
                "modules": [wire(s) for s in self.supervisor.statuses()],
                "messages": wire(self.messages.counters()),
                "socket": str(self.messages.path) if self.messages.path else None}


def ask_restart(state_root: Path, module: str, timeout: float = 30.0) -> dict[str, Any]:
    """``outpost agent restart MODULE``: the running agent's answer, or OutpostError."""
    import socket

    path = control_path(state_root)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except OSError:
            raise OutpostError("module_unknown", f"This machine runs no module named "
                               f"'{module}' (the agent runs no modules, or it is not "
                               "running).", module=module) from None
        sock.sendall(json.dumps({"op": "restart", "module": module}).encode() + b"\n")
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        answer: dict[str, Any] = json.loads(b"".join(chunks) or b"{}")
    finally:
        with contextlib.suppress(OSError):
            sock.close()
    return answer
