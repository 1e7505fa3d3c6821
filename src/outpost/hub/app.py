"""The hub's ASGI application: routes are thin and call the concept modules."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge
from prometheus_client import disable_created_metrics, generate_latest
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from outpost import __version__
from outpost.protocol.errors import OutpostError
from outpost.protocol.models import Heartbeat, JobBatch, RegisterRequest

from . import accounts, auth, groups, jobs, machines, runbooks
from . import asset_routes, job_identity
from . import schedule_routes
from .config import HubConfig, HubPaths, ca_fingerprint, vault_for
from .dispatcher import Dispatcher

log = logging.getLogger("outpost.hub")
REPORTS_MAX = 256  # attempts' reports in one POST /v1/agent/reports
# The *_created series double every counter and tell an operator nothing here.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Hub:
    """Everything a request handler needs, created once per process."""

    def __init__(self, paths: HubPaths, config: HubConfig, engine: AsyncEngine) -> None:
        self.paths = paths
        self.config = config
        self.engine = engine
        self.vault = vault_for(paths)
        self.dispatcher = Dispatcher(engine)
        self.ca_pem = paths.ca_cert.read_text()
        self.ca_fingerprint = ca_fingerprint(paths)
        self.registry = CollectorRegistry()
        self.requests = Counter("outpost_http_requests", "HTTP requests served",
                                ["status"], registry=self.registry)
        self.registrations = Counter("outpost_registrations", "Machines registered",
                                     registry=self.registry)
        self.heartbeats = Counter("outpost_heartbeats", "Heartbeats received",
                                  registry=self.registry)
        self.refusals = Counter("outpost_refusals", "Requests refused, by reason",
                                ["reason"], registry=self.registry)
        self.machines = Gauge("outpost_machines", "Machines by status", ["status"],
                              registry=self.registry)


class AccountCreate(BaseModel):
    name: str = Field(min_length=1, max_length=128)


class RunbookPublish(BaseModel):
    name: str = Field(min_length=1, max_length=128)
    content: str
    type: str | None = None
    filename: str = ""
    description: str = ""
    params: list[str] = Field(default_factory=list,
                              description="NAME:TYPE[=DEFAULT]; TYPE string, int, bool or json")
    log_verbose: bool = False
    log_progress: bool = False


class JobStart(BaseModel):
    runbook: str = Field(min_length=1, max_length=128)
    group: str = Field(min_length=1, max_length=64)
    params: dict[str, Any] = Field(default_factory=dict)
    version: int | None = Field(default=None, ge=1)
    timeout: float | None = Field(default=None, gt=0)


class JobAttempt(BaseModel):
    attempt: int = Field(ge=1)


class JobEnd(BaseModel):
    exit_code: int | None = None
    signal: int | None = None
    reason: str = Field(default="", max_length=2000)
    cause: Literal["exit", "timeout", "stopped", "killed", "lost"] = "exit"
    run_as: str | None = Field(default=None, max_length=200, description=(
        "Who the runbook ran as, said by the agent ('outpost-job3', 'root (group web asks "
        "for root)')."))


class JobReport(JobAttempt):
    started: bool = Field(default=False, description="The runbook's process started (or "
                                                      "went on after a pause).")
    records: list[dict[str, Any]] = Field(default_factory=list, max_length=10000)
    end: JobEnd | None = None


class JobReportItem(JobReport):
    job_id: str = Field(min_length=1, max_length=128)


class JobReports(BaseModel):
    reports: list[JobReportItem] = Field(min_length=1, max_length=REPORTS_MAX)
    claim: int = Field(default=0, ge=0, le=256, description=(
        "How many jobs the agent runs at once (0 while it takes none). When a report ends "
        "an attempt, the answer carries the jobs claimed for the slots that freed up."))


class GroupSettings(BaseModel):
    """Only the settings given are changed."""

    run_as: str | None = Field(default=None, max_length=64,
                               description="The user a root agent runs the group's runbooks "
                                           "as ('root' included); null for the agent's job "
                                           "users (or its own user when it is not root).")
    memory_mb: int | None = Field(default=None, ge=0, le=2**22, description=(
        "Each job's memory limit in MiB; 0 or null: the agent's default (job_memory_mb)."))
    cpus: float | None = Field(default=None, ge=0, le=1024, description=(
        "Each job's CPU limit in CPUs; 0 or null: the agent's default (job_cpus)."))
    max_processes: int | None = Field(default=None, ge=0, le=2**22, description=(
        "Each job's process limit; 0 or null: the agent's default (job_processes)."))


class WorkDone(BaseModel):
    result: dict[str, Any] = Field(default_factory=dict)


async def operator(
    request: Request, authorization: Annotated[str | None, Header()] = None,
) -> accounts.Principal:
    """The account (and admin flag) of the bearer token; 401 otherwise."""
    hub: Hub = request.app.state.hub
    return await auth.operator(hub.engine, authorization)


Op = Annotated[accounts.Principal, Depends(operator)]


def _error_response(hub: Hub | None, exc: OutpostError) -> JSONResponse:
    if hub is not None and exc.entry.http_status in (401, 403):
        hub.refusals.labels(exc.reason).inc()
    return JSONResponse(exc.to_body(), status_code=exc.entry.http_status)


async def _supervise(name: str, period: float, work: Any) -> None:
    """Run ``work`` every ``period`` seconds; a failure is logged and the loop goes on."""
    while True:
        try:
            await work()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background task %s failed; retrying in %.0f s", name, period)
        await asyncio.sleep(period)


class CountRequests:
    """Counts answers by status. A plain ASGI middleware, not Starlette's BaseHTTPMiddleware:
    that one hides a client's hang-up from the handler (a long-poll must see it) and adds a
    task per request on the dispatch path."""

    def __init__(self, app: ASGIApp, counter: Counter) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.counter.labels(str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


class ValidUnicode:
    """Refuses a JSON body that escapes half of a UTF-16 pair (``"\\ud800"``).

    Such a string is no Unicode text: neither database can store it, no answer that quotes
    it can be encoded, and a field typed ``Any`` would let it through to both. One check
    here covers every route; a body without a ``\\uD8..`` to ``\\uDF..`` escape (nearly
    all) costs one regular-expression scan.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, receive, send)  # the client left: let the app see it
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if _SURROGATE.search(body):
            try:
                bad = _has_lone_surrogate(json.loads(body))
            except ValueError:
                bad = False  # not JSON: the route says what is wrong with it
            if bad:
                err = OutpostError(
                    "invalid_request", "A text value contains a lone UTF-16 surrogate (such "
                    "as \\ud800), which is not a valid Unicode character.",
                    fix="Send valid Unicode text: encode files as UTF-8, and escape a "
                        "character outside the basic plane as a surrogate pair.")
                await JSONResponse(err.to_body(), status_code=422)(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(hub: Hub) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await jobs.extend_leases(hub.engine)
        tasks = [asyncio.create_task(_supervise(name, period, work), name=name)
                 for name, period, work in (
                     ("prune-nonces", 60.0, lambda: auth.prune_nonces(hub.engine)),
                     ("reap-leases", 1.0, reap),
                     ("scheduler", 5.0, scheduler.run))]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await hub.engine.dispose()

    async def reap() -> None:
        """HW-1: an expired lease is a failed activation; wake the group for the retry."""
        for account_id, group in await jobs.reap(hub.engine):
            hub.dispatcher.wake(f"g:{account_id}:{group}")

    app = FastAPI(title="Outpost hub", version=__version__, lifespan=lifespan,
                  docs_url="/docs", redoc_url=None)
    app.state.hub = hub

    app.add_middleware(ValidUnicode)
    app.add_middleware(CountRequests, counter=hub.requests)

    @app.exception_handler(OutpostError)
    async def outpost_error(_request: Request, exc: OutpostError) -> JSONResponse:
        return _error_response(hub, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [{"field": ".".join(str(p) for p in e.get("loc", ())), "problem": e["msg"]}
                    for e in exc.errors()]
        first = problems[0] if problems else {"field": "?", "problem": "invalid"}
        err = OutpostError("invalid_request",
                           f"The request is not valid: {first['field']}: {first['problem']}.",
                           problems=problems)
        return _error_response(hub, err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err = OutpostError("not_found", "No such API path.",
                               fix="See /openapi.json for the paths this hub serves.")
        else:
            err = OutpostError("invalid_request", f"{exc.detail}", status=exc.status_code)
            return JSONResponse(err.to_body(), status_code=exc.status_code)
        return _error_response(hub, err)

    @app.exception_handler(OperationalError)
    async def db_down(_request: Request, exc: OperationalError) -> JSONResponse:
        log.error("database error: %s", exc)
        return _error_response(hub, OutpostError("database_unavailable"))

    @app.exception_handler(DBAPIError)
    async def db_refused(request: Request, exc: DBAPIError) -> JSONResponse:
        # PostgreSQL cannot store the NUL character in text; that is bad input, not a crash.
        if "0x00" in str(exc.orig):
            return _error_response(hub, OutpostError(
                "invalid_request", "A text value contains the NUL character (\\u0000), which "
                "the hub's database cannot store.", fix="Remove the NUL character and send the "
                "request again."))
        return await crashed(request, exc)

    @app.exception_handler(Exception)
    async def crashed(_request: Request, exc: Exception) -> JSONResponse:
        request_id = uuid.uuid4().hex[:12]
        log.exception("request %s failed", request_id)
        return _error_response(hub, OutpostError("internal_error", request_id=request_id))

    async def signed_machine(request: Request) -> tuple[Any, bytes]:
        body = await request.body()
        row = await auth.machine(hub.engine, request.headers, request.method,
                                 auth.raw_path(request.scope), body)
        auth.check_version(request.headers.get("x-outpost-agent-version"),
                           hub.config.min_agent_version)
        return row, body

    # --- public -------------------------------------------------------------------------
    @app.get("/healthz", tags=["hub"])
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "hub_time": time.time(),
                "min_agent_version": hub.config.min_agent_version}

    @app.get("/metrics", tags=["hub"], response_class=PlainTextResponse)
    async def metrics() -> Response:
        counts = await machines.counts_by_status(hub.engine)
        for state in ("Pending", "Healthy", "Unresponsive", "Disconnected"):
            hub.machines.labels(state).set(counts.get(state, 0))
        return Response(generate_latest(hub.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/ca", tags=["hub"], response_class=PlainTextResponse)
    async def ca() -> Response:
        """The hub's CA certificate; agents compare its fingerprint with the pinned one."""
        return PlainTextResponse(hub.ca_pem, headers={"X-Outpost-CA-Fingerprint":
                                                      hub.ca_fingerprint})

    # --- agents -------------------------------------------------------------------------
    @app.post("/v1/agent/register", tags=["agent"], status_code=201)
    async def register(request: Request) -> dict[str, Any]:
        body = await request.body()
        account_id = await auth.registration(hub.engine, hub.vault, request.headers,
                                             request.method, auth.raw_path(request.scope), body)
        try:
            req = RegisterRequest.model_validate_json(body)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from exc
        auth.check_version(req.facts.agent_version, hub.config.min_agent_version)
        result = await machines.register(hub.engine, account_id, req,
                                         hub.config.heartbeat_interval)
        hub.registrations.inc()
        log.info("registered machine %s (%s) in group %s", req.name, result["machine_id"],
                 req.group)
        return result

    @app.post("/v1/agent/deregister", tags=["agent"])
    async def deregister(request: Request) -> dict[str, Any]:
        row, _ = await signed_machine(request)
        await machines.deregister(hub.engine, row.id)
        return {"machine_id": row.id, "deregistered": True}

    @app.get("/v1/agent/registration", tags=["agent"])
    async def registration(request: Request) -> dict[str, Any]:
        """This machine's registration as the hub holds it: an agent whose cached copy is
        corrupt fetches it again (HW-9)."""
        row, _ = await signed_machine(request)
        return {"machine_id": row.id, "account_id": row.account_id, "name": row.name,
                "group": row.group_name, "labels": row.labels,
                "registered_at": row.registered_at}

    @app.post("/v1/agent/heartbeat", tags=["agent"])
    async def heartbeat(request: Request) -> dict[str, Any]:
        row, body = await signed_machine(request)
        try:
            beat = Heartbeat.model_validate_json(body)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from exc
        now = await machines.record_heartbeat(hub.engine, row.id, beat)
        abandon = await jobs.renew(hub.engine, row, [(h.id, h.attempt) for h in beat.jobs])
        hub.heartbeats.inc()
        return {"hub_time": now, "min_agent_version": hub.config.min_agent_version,
                "machine_id": row.id, "abandon": abandon}

    @app.post("/v1/agent/poll", tags=["agent"])
    async def poll(request: Request,
                   wait: Annotated[float, Query(ge=0, le=300)] = 25.0,
                   capacity: Annotated[int, Query(ge=0, le=256)] = 0) -> dict[str, Any]:
        """Hold until work for this machine appears.

        ``capacity`` is how many jobs the agent runs at once (0 while it takes none); the
        jobs the hub sees it holding count against it.
        """
        row, _ = await signed_machine(request)
        items = await hub.dispatcher.poll(row, min(wait, hub.config.poll_timeout),
                                          capacity=capacity, gone=request.is_disconnected)
        await job_identity.add_tokens(hub.engine, hub.vault, items)
        return {"items": items}

    async def _agent_body(request: Request, model: type[Any]) -> tuple[Any, Any]:
        row, body = await signed_machine(request)
        try:
            return row, model.model_validate_json(body or b"{}")
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from exc

    @app.post("/v1/agent/jobs/{job_id}/report", tags=["agent"])
    async def job_report(request: Request, job_id: str) -> dict[str, Any]:
        """One attempt's news, in order: its process started, output records, its end."""
        row, body = await _agent_body(request, JobReport)
        status = await jobs.report(
            hub.engine, row.id, job_id, body.attempt, started=body.started,
            records=body.records, end=body.end.model_dump() if body.end else None)
        if body.end is not None:
            # The machine's slot is free: its waiting long-poll claims again at once.
            hub.dispatcher.wake(f"m:{row.id}")
            if status == "Queued":  # a failed activation: any machine of the group retries
                hub.dispatcher.wake(f"g:{row.account_id}:{row.group_name}")
        return {"id": job_id, "status": status}

    @app.post("/v1/agent/reports", tags=["agent"])
    async def job_reports(request: Request) -> dict[str, Any]:
        """Several attempts' reports in one transaction (each as ``/jobs/{id}/report``
        takes it), and in the answer the jobs claimed for the slots they freed: an agent
        that runs many short jobs needs neither a request per job nor a long-poll answer
        per freed slot."""
        row, body = await _agent_body(request, JobReports)
        results, items = await jobs.report_many(
            hub.engine, row, [r.model_dump() for r in body.reports], body.claim)
        if any(r.end is not None for r in body.reports) and not items:
            # Nothing was claimed here (no capacity given, or no job queued): the waiting
            # long-poll looks again, for work items too.
            hub.dispatcher.wake(f"m:{row.id}")
        if any(r.get("status") == "Queued" for r in results):
            hub.dispatcher.wake(f"g:{row.account_id}:{row.group_name}")
        await job_identity.add_tokens(hub.engine, hub.vault, items)
        return {"results": results, "items": items}

    @app.post("/v1/agent/jobs/{job_id}/paused", tags=["agent"])
    async def job_paused(request: Request, job_id: str) -> dict[str, Any]:
        row, body = await _agent_body(request, JobAttempt)
        return {"id": job_id, "status": await jobs.paused(hub.engine, row.id, job_id,
                                                          body.attempt)}

    @app.post("/v1/agent/work/{item_id}/done", tags=["agent"])
    async def work_done(request: Request, item_id: str) -> dict[str, Any]:
        row, body = await signed_machine(request)
        try:
            done = WorkDone.model_validate_json(body or b"{}")
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from exc
        if not await hub.dispatcher.complete(row.id, item_id, done.result):
            raise OutpostError("not_found", f"No work item '{item_id}' claimed by this machine.")
        return {"id": item_id, "done": True}

    # --- operators ----------------------------------------------------------------------
    @app.get("/v1/whoami", tags=["operator"])
    async def whoami(principal: Op) -> dict[str, Any]:
        return {"account_id": principal.account_id, "admin": principal.admin}

    @app.get("/v1/accounts", tags=["operator"])
    async def account_list(principal: Op) -> list[dict[str, Any]]:
        return await accounts.listing(hub.engine, principal)

    @app.post("/v1/accounts", tags=["operator"], status_code=201)
    async def account_create(principal: Op, body: AccountCreate) -> dict[str, str]:
        if not principal.admin:
            raise OutpostError("admin_required")
        return await accounts.create(hub.engine, hub.vault, body.name)

    @app.get("/v1/accounts/{account_id}/keys", tags=["operator"])
    async def account_keys(principal: Op, account_id: str) -> dict[str, str]:
        return await accounts.keys(hub.engine, hub.vault, principal, account_id)

    @app.post("/v1/accounts/{account_id}/keys/{which}/regenerate", tags=["operator"])
    async def account_regenerate(principal: Op, account_id: str, which: str) -> dict[str, str]:
        return await accounts.regenerate(hub.engine, hub.vault, principal, account_id, which)

    @app.get("/v1/machines", tags=["operator"])
    async def machine_list(principal: Op) -> list[dict[str, Any]]:
        return await machines.listing(hub.engine, principal.account_id)

    @app.get("/v1/heartbeats", tags=["operator"])
    async def machine_heartbeats(principal: Op) -> list[dict[str, Any]]:
        return await machines.heartbeats(hub.engine, principal.account_id)

    @app.get("/v1/machines/{name}", tags=["operator"])
    async def machine_show(principal: Op, name: str) -> dict[str, Any]:
        row = await machines.find(hub.engine, principal.account_id, name)
        return machines.view(row, time.time())

    @app.delete("/v1/machines/{name}", tags=["operator"])
    async def machine_remove(principal: Op, name: str) -> dict[str, Any]:
        row = await machines.find(hub.engine, principal.account_id, name)
        await machines.deregister(hub.engine, row.id)
        return {"name": row.name, "removed": True}

    @app.post("/v1/machines/{name}/ping", tags=["operator"])
    async def machine_ping(principal: Op, name: str,
                           timeout: Annotated[float, Query(gt=0, le=120)] = 10.0
                           ) -> dict[str, Any]:
        """Send a work item to one machine and wait until its agent answers it."""
        row = await machines.find(hub.engine, principal.account_id, name)
        started = time.time()
        item_id = await hub.dispatcher.submit(row.account_id, "ping", {"sent_at": started},
                                              machine_id=row.id)
        done = await hub.dispatcher.wait_done(item_id, timeout)
        if done is None:
            await hub.dispatcher.withdraw(item_id)
            raise OutpostError("ping_timeout",
                               f"Machine '{row.name}' did not answer the ping within "
                               f"{timeout:g} s.", machine=row.name)
        return {"machine": row.name, "round_trip_ms": round((done["done_at"] - started) * 1e3, 2),
                "agent_received_at": done["result"].get("received_at")}

    @app.post("/v1/runbooks", tags=["runbooks"], status_code=201)
    async def runbook_publish(principal: Op, body: RunbookPublish) -> dict[str, Any]:
        """Store a new version of a runbook."""
        return await runbooks.publish(
            hub.engine, principal.account_id, body.name, body.content, kind=body.type,
            filename=body.filename, description=body.description, param_specs=body.params,
            log_verbose=body.log_verbose, log_progress=body.log_progress)

    @app.get("/v1/runbooks", tags=["runbooks"])
    async def runbook_list(principal: Op) -> list[dict[str, Any]]:
        return await runbooks.listing(hub.engine, principal.account_id)

    @app.get("/v1/runbooks/{name}", tags=["runbooks"])
    async def runbook_show(principal: Op, name: str,
                           version: Annotated[int | None, Query(ge=1)] = None
                           ) -> dict[str, Any]:
        return await runbooks.get(hub.engine, principal.account_id, name, version)

    @app.post("/v1/jobs", tags=["jobs"], status_code=201)
    async def job_start(principal: Op, body: JobStart) -> dict[str, Any]:
        """Queue a job; parameters are checked first, so a bad one queues nothing."""
        job = await jobs.start(hub.engine, principal.account_id, body.runbook, body.group,
                               body.params, body.version, body.timeout)
        hub.dispatcher.wake(f"g:{principal.account_id}:{body.group}")
        return job

    @app.post("/v1/jobs/batch", tags=["jobs"], status_code=201)
    async def job_start_batch(principal: Op, body: JobBatch) -> dict[str, Any]:
        """Queue 1 to 1000 jobs, all or none: every entry is checked as ``POST /v1/jobs``
        checks one before anything is stored, and the first bad one refuses the batch."""
        def entries() -> Iterator[dict[str, Any]]:
            # Read as start_many goes, so the first bad entry is named whatever is wrong.
            for index, entry in enumerate(body.jobs):
                try:
                    start = JobStart.model_validate(entry)
                except ValidationError as exc:
                    problems = [{"field": ".".join(str(p) for p in e.get("loc", ())) or "?",
                                 "problem": e["msg"]} for e in exc.errors()]
                    raise OutpostError(
                        "invalid_request", f"jobs[{index}]: The request is not valid: "
                        f"{problems[0]['field']}: {problems[0]['problem']}.",
                        index=index, problems=problems) from exc
                yield start.model_dump()

        views = await jobs.start_many(hub.engine, principal.account_id, entries())
        for group in dict.fromkeys(view["group_name"] for view in views):
            hub.dispatcher.wake(f"g:{principal.account_id}:{group}")
        return {"jobs": views}

    @app.post("/v1/jobs/{job_id}/{action}", tags=["jobs"])
    async def job_control(principal: Op, job_id: str,
                          action: Literal["stop", "suspend", "resume"]) -> dict[str, Any]:
        """Stop, suspend or resume a job; a machine that holds it is told at once."""
        job, machine_id = await jobs.control(hub.engine, principal.account_id, job_id, action)
        if machine_id is not None:
            await hub.dispatcher.submit(principal.account_id, "job_control",
                                        {"job_id": job_id, "attempt": job["attempt"],
                                         "action": action}, machine_id=machine_id)
        elif job["status"] == "Queued":
            hub.dispatcher.wake(f"g:{principal.account_id}:{job['group_name']}")
        return job

    @app.get("/v1/groups", tags=["groups"])
    async def group_list(principal: Op) -> list[dict[str, Any]]:
        """The account's groups: those with machines and those with settings."""
        return await groups.listing(hub.engine, principal.account_id)

    @app.put("/v1/groups/{name}", tags=["groups"])
    async def group_set(principal: Op, name: str, body: GroupSettings) -> dict[str, Any]:
        return await groups.configure(hub.engine, principal.account_id, name,
                                      body.model_dump(include=body.model_fields_set))

    @app.get("/v1/jobs", tags=["jobs"])
    async def job_list(principal: Op, status: str | None = None,
                       limit: Annotated[int, Query(ge=1, le=10000)] = 200
                       ) -> list[dict[str, Any]]:
        """The newest jobs first."""
        return await jobs.listing(hub.engine, principal.account_id, status, limit)

    @app.get("/v1/jobs/{job_id}", tags=["jobs"])
    async def job_show(principal: Op, job_id: str) -> dict[str, Any]:
        return await jobs.get(hub.engine, principal.account_id, job_id)

    @app.get("/v1/jobs/{job_id}/output", tags=["jobs"])
    async def job_output(principal: Op, job_id: str,
                         after: Annotated[int, Query(ge=-1)] = -1,
                         stream: Annotated[list[str] | None, Query()] = None,
                         limit: Annotated[int, Query(ge=1, le=50000)] = 10000
                         ) -> list[dict[str, Any]]:
        """A page of the job's output records after sequence ``after``, in order."""
        return await jobs.records(hub.engine, principal.account_id, job_id, after, stream,
                                  limit)

    asset_routes.add_routes(app, hub)
    scheduler = schedule_routes.add_routes(app, hub)
    return app
