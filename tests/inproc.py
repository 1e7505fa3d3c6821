"""The fast tier: a hub in this process, spoken to through httpx's ASGI transport.

``running_hub`` initialises a hub data directory (``outpost hub init``'s own function),
builds the app with ``create_app``, drives its lifespan (so the reaper and the other
background tasks run as in ``hub run``) and yields an :class:`InprocHub`. Operator calls
carry the admin token; :meth:`InprocHub.machine` registers a machine for real (a request
signed with the account key) and gives a :class:`Machine` whose calls are signed with its
own Ed25519 key by ``outpost.protocol.signing``, exactly as an agent signs them. No socket,
no TLS, no subprocess: a behaviour of the API is tested in milliseconds.

What this tier does not cover is the process around the app (uvicorn, TLS, signals, the
agent daemon): those stay with the integration tests.
"""

from __future__ import annotations


import json
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from nacl.signing import SigningKey

from outpost import __version__
from outpost.hub import jobs
from outpost.hub.app import Hub, create_app
from outpost.hub.config import HubPaths, InitResult
from outpost.hub.config import init as hub_init
from outpost.hub.server import prepare
from outpost.protocol import signing

BASE = "http://hub.inproc"

# The marks of a fast-tier test module: ``pytestmark = FAST``. The hub's code runs in the
# test's process here, so pytest's warnings-as-errors reaches it (a deprecation in the hub's
# use of a library fails these tests, where a subprocess hub would only log it).
FAST = [pytest.mark.anyio]

_TEMPLATE: tuple[Path, InitResult] | None = None


def _template() -> tuple[Path, InitResult]:
    """One initialised data directory per test process (CA, keys, seed): each hub gets a
    copy, so a test pays for a file copy, not for key generation."""
    global _TEMPLATE
    if _TEMPLATE is None:
        root = Path(tempfile.mkdtemp(prefix="outpost-inproc-template-")) / "hub"
        import atexit

        atexit.register(shutil.rmtree, root.parent, True)
        _TEMPLATE = (root, hub_init(root, ["localhost"], "127.0.0.1:8443"))
    return _TEMPLATE


async def _template_database() -> Path:
    template, _ = _template()
    path = template.parent / "template.db"
    if not path.exists():
        hub = await prepare(HubPaths(template), f"sqlite:///{path}")
        await hub.engine.dispose()
        if hub.job_metrics.ended in jobs.ended_listeners:
            jobs.ended_listeners.remove(hub.job_metrics.ended)
    return path


class Clock:
    """The hub's wall clock as the test sets it: ``advance(seconds)`` moves ``time.time``
    forward for the whole process, so a lease expires without waiting for it. (Signature
    dates come from ``datetime.now``, which does not move, so signed calls stay valid.)"""

    def __init__(self, set_time: Callable[[Callable[[], float]], None]) -> None:
        self._real = time.time
        self.offset = 0.0
        set_time(lambda: self._real() + self.offset)

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def now(self) -> float:
        return self._real() + self.offset


@dataclass
class Machine:
    """A registered machine: what it says to the hub is up to the test (no agent daemon)."""

    hub: InprocHub
    id: str
    name: str
    group: str
    key: SigningKey

    async def call(self, method: str, path: str, payload: Any = None) -> httpx.Response:
        """One request signed with the machine's key; ``payload`` is sent as JSON, or as it
        is when it is bytes (JSON a careless client wrote, say)."""
        if isinstance(payload, bytes):
            body = payload
        else:
            body = b"" if payload is None else json.dumps(payload).encode()
        stamp = signing.format_time(_utcnow())
        nonce = signing.new_nonce()
        headers = {signing.H_MACHINE: self.id, signing.H_DATE: stamp,
                   signing.H_NONCE: nonce, signing.H_AGENT_VERSION: __version__,
                   signing.H_SIGNATURE: signing.sign_machine(self.key, method, path, stamp,
                                                             nonce, body)}
        if body:
            headers["Content-Type"] = "application/json"
        return await self.hub.http.request(method, path, content=body, headers=headers)

    async def replay(self, request: httpx.Request) -> httpx.Response:
        """The very same signed request sent again (as a replaying attacker would)."""
        return await self.hub.http.send(request)

    async def ok(self, method: str, path: str, payload: Any = None) -> Any:
        """The JSON answer of a call that must succeed."""
        response = await self.call(method, path, payload)
        assert response.is_success, f"{method} {path}: {response.status_code} {response.text}"
        return response.json()

    async def poll(self, capacity: int = 1, wait: float = 0) -> list[dict[str, Any]]:
        answer = await self.ok("POST", f"/v1/agent/poll?wait={wait:g}&capacity={capacity}")
        items: list[dict[str, Any]] = answer["items"]
        return items

    async def claimed(self, capacity: int = 1) -> list[str]:
        """The ids of the jobs one poll claims."""
        return [i["payload"]["job_id"] for i in await self.poll(capacity)
                if i["kind"] == "job"]

    async def heartbeat(self, held: Sequence[tuple[str, int]] = (),
                        interval: float = 1.0) -> dict[str, Any]:
        answer: dict[str, Any] = await self.ok("POST", "/v1/agent/heartbeat", {
            "agent_version": __version__, "heartbeat_interval": interval,
            "running_jobs": len(held),
            "jobs": [{"id": job_id, "attempt": attempt} for job_id, attempt in held]})
        return answer

    async def report(self, job_id: str, attempt: int = 1, *, started: bool = False,
                     records: Sequence[dict[str, Any]] = (),
                     end: dict[str, Any] | None = None) -> httpx.Response:
        payload: dict[str, Any] = {"attempt": attempt, "started": started,
                                   "records": list(records)}
        if end is not None:
            payload["end"] = end
        return await self.call("POST", f"/v1/agent/jobs/{job_id}/report", payload)


def _utcnow() -> Any:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)


@dataclass
class InprocHub:
    """A hub app in this process; ``http`` reaches it through the ASGI transport."""

    hub: Hub
    init: InitResult
    database_url: str
    http: httpx.AsyncClient
    machines: dict[str, Machine] = field(default_factory=dict)

    @property
    def admin_token(self) -> str:
        return self.init.admin_token

    async def stop_task(self, name: str) -> None:
        """Stop one of the hub's background tasks (``reap-leases``, say), so that only the
        test runs what it did: a test that moves the clock and judges leases with its own
        Reaper must not race the hub's, which also sees real time pass under load."""
        await self.hub.tasks.end(name)

    async def api(self, method: str, path: str, token: str | None = None,
                  **kw: Any) -> httpx.Response:
        """An operator call (the admin token unless ``token`` is given)."""
        headers = {"Authorization": f"Bearer {token or self.admin_token}",
                   **kw.pop("headers", {})}
        return await self.http.request(method, path, headers=headers, **kw)

    async def ok(self, method: str, path: str, **kw: Any) -> Any:
        response = await self.api(method, path, **kw)
        assert response.is_success, f"{method} {path}: {response.status_code} {response.text}"
        return response.json()

    async def runbook(self, name: str = "noop", content: str = "true") -> None:
        await self.ok("POST", "/v1/runbooks", json={"name": name, "type": "bash",
                                                     "content": content})

    async def start_job(self, runbook: str = "noop", group: str = "web",
                        **extra: Any) -> str:
        job = await self.ok("POST", "/v1/jobs", json={"runbook": runbook, "group": group,
                                                      **extra})
        return str(job["id"])

    async def job(self, job_id: str) -> dict[str, Any]:
        answer: dict[str, Any] = await self.ok("GET", f"/v1/jobs/{job_id}")
        return answer

    async def output(self, job_id: str) -> list[dict[str, Any]]:
        answer: list[dict[str, Any]] = await self.ok("GET", f"/v1/jobs/{job_id}/output")
        return answer

    async def machine(self, name: str, group: str = "web",
                      labels: dict[str, str] | None = None,
                      account: dict[str, str] | None = None) -> Machine:
        """Register machine ``name`` through ``POST /v1/agent/register``, signed with the
        account key as ``outpost agent register`` signs it; in ``account`` (the answer of
        ``POST /v1/accounts``) when given, else in the hub's first account."""
        from outpost.agent.facts import machine_facts

        key = SigningKey.generate()
        body = json.dumps({"name": name, "group": group, "labels": labels or {},
                           "public_key": signing.b64(bytes(key.verify_key)),
                           "facts": machine_facts()}).encode()
        path, stamp, nonce = "/v1/agent/register", signing.format_time(_utcnow()), \
            signing.new_nonce()
        account_key = signing.unb64(account["primary_key"] if account
                                    else self.init.primary_key)
        account_id = account["id"] if account else self.init.account_id
        headers = {signing.H_ACCOUNT: account_id, signing.H_DATE: stamp,
                   signing.H_NONCE: nonce, signing.H_AGENT_VERSION: __version__,
                   "Content-Type": "application/json",
                   signing.H_SIGNATURE: signing.sign_account(account_key, "POST", path,
                                                             stamp, body, nonce)}
        response = await self.http.post(path, content=body, headers=headers)
        assert response.status_code == 201, response.text
        machine = Machine(self, response.json()["machine_id"], name, group, key)
        self.machines[name] = machine
        return machine


@asynccontextmanager
async def running_hub(root: Path, database_url: str | None = None, *,
                      lean_routes: bool = True) -> AsyncIterator[InprocHub]:
    """A hub on ``database_url`` (a new SQLite file under ``root`` by default), its
    lifespan running, for the length of the ``async with`` (``lean_routes``: as
    ``create_app`` takes it)."""
    template, init = _template()
    data_dir = root / "hub"
    shutil.copytree(template, data_dir)
    if database_url is None:
        # A copy of a database migrated once per process: prepare() below finds it at the
        # newest revision and seeded, and only checks that.
        shutil.copyfile(await _template_database(), root / "hub.db")
    url = database_url or f"sqlite:///{root / 'hub.db'}"
    hub = await prepare(HubPaths(data_dir), url)
    app = create_app(hub, lean_routes=lean_routes)
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url=BASE,
                                         timeout=30) as http:
                yield InprocHub(hub, init, url, http)
    finally:
        # Hub() adds its metrics to a module-level listener list; the next hub of this
        # process must not count this one's jobs.
        if hub.job_metrics.ended in jobs.ended_listeners:
            jobs.ended_listeners.remove(hub.job_metrics.ended)
