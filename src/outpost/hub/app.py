"""The hub's ASGI application: routes are thin and call the concept modules."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge
from prometheus_client import disable_created_metrics, generate_latest
from pydantic import Field, ValidationError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from outpost import __version__
from outpost.protocol import durations
from outpost.protocol.errors import OutpostError
from outpost.protocol.models import INT32_MAX, INT64_MAX, ErrorBody, Heartbeat, JobBatch
from outpost.protocol.models import RegisterRequest, Wire
from outpost.protocol import models as m

from . import accounts, auth, db, edge, groups, jobs, machines, runbooks
from . import asset_routes, fanout_routes, job_identity, metrics, openapi
from .openapi import ok
from . import agent_dist_routes, schedule_routes
from .config import HubConfig, HubPaths, ca_fingerprint, vault_for
from .dispatcher import Dispatcher

log = logging.getLogger("outpost.hub")
REPORTS_MAX = 256  # attempts' reports in one POST /v1/agent/reports
# The *_created series double every counter and tell an operator nothing here.
disable_created_metrics()  # type: ignore[no-untyped-call]


_STATUS_TEXT = {
    400: "The body is not JSON (E3003).",
    401: "No valid token, machine signature or job token; a replayed request (E3001, E1008, "
         "E1009, E1010, E5002).",
    403: "Not allowed to this caller, or a refused registration (E3004, E1001-E1003).",
    404: "No such object in the caller's account, or no such path (E3002, E6006).",
    409: "Conflicts with what exists or with the job's state (E3009, E4009, E1004).",
    413: "The body is larger than the route takes (E3011, E4005, E5005, E6007).",
    422: "A field is missing, of the wrong type or out of range; the message names it "
         "(E3003 and the other 4xx codes of errors.md).",
    426: "The agent is older than the hub's min_agent_version (E1007).",
    500: "The hub failed while handling the request; details.request_id is in its log "
         "(E3006).",
    503: "The hub's database cannot be reached (E3007).",
    504: "The machine did not answer in time (E3010).",
}
COMMON_ERRORS = (400, 401, 403, 404, 409, 413, 422, 500, 503)


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error answers: every one is an ErrorBody."""
    return {status: {"model": ErrorBody, "description": _STATUS_TEXT[status]}
            for status in statuses}


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
        failures = Counter("outpost_database_failures", "Database outages met (answered 503 "
                           "E3007), by kind", ["kind"], registry=self.registry)
        if isinstance(engine, db.Engine):
            engine.health.listeners.append(lambda kind: failures.labels(kind).inc())
        self.job_metrics = metrics.JobMetrics(self.registry)
        jobs.ended_listeners.append(self.job_metrics.ended)


class AccountCreate(Wire):
    name: str = Field(min_length=1, max_length=128)


class RunbookPublish(Wire):
    name: str = Field(min_length=1, max_length=128)
    content: str
    type: str | None = None
    filename: str = ""
    description: str = ""
    params: list[str] = Field(default_factory=list,
                              description="NAME:TYPE[=DEFAULT]; TYPE string, int, bool or json")
    log_verbose: bool = False
    log_progress: bool = False


class JobStart(Wire):
    runbook: str = Field(min_length=1, max_length=128)
    group: str = Field(min_length=1, max_length=64)
    params: dict[str, Any] = Field(default_factory=dict)
    version: int | None = Field(default=None, ge=1, le=INT32_MAX)
    timeout: float | str | None = Field(
        default=None, description="Seconds, or a duration such as 90s, 5m, 10min or 1h30m; "
        "at most 7 days.")


class JobAttempt(Wire):
    attempt: int = Field(ge=1, le=INT32_MAX)


class JobEnd(Wire):
    exit_code: int | None = Field(default=None, ge=-INT32_MAX - 1, le=INT32_MAX)
    signal: int | None = Field(default=None, ge=0, le=INT32_MAX)
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


class JobReports(Wire):
    reports: list[JobReportItem] = Field(min_length=1, max_length=REPORTS_MAX)
    claim: int = Field(default=0, ge=0, le=256, description=(
        "How many jobs the agent runs at once (0 while it takes none). When a report ends "
        "an attempt, the answer carries the jobs claimed for the slots that freed up."))


class GroupSettings(Wire):
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


class WorkDone(Wire):
    result: dict[str, Any] = Field(default_factory=dict)


async def operator(request: Request, _scheme: openapi.OperatorScheme = None
                   ) -> accounts.Principal:
    """The account (and admin flag) of the bearer token; 401 otherwise."""
    hub: Hub = request.app.state.hub
    return await auth.operator(hub.engine, request.headers.get("authorization"))


Op = Annotated[accounts.Principal, Depends(operator)]


def _error_response(hub: Hub | None, exc: OutpostError) -> JSONResponse:
    if hub is not None and exc.entry.http_status in (401, 403):
        hub.refusals.labels(exc.reason).inc()
    headers = ({"Retry-After": str(exc.retry_after)}
               if isinstance(exc, db.DatabaseUnavailable) else None)
    return JSONResponse(exc.to_body(), status_code=exc.entry.http_status, headers=headers)


def _methods_of(request: Request) -> list[str]:
    """The methods of every route of this path; only the literal routes' where one is
    literal (POST /v1/jobs/batch, not GET /v1/jobs/{job_id} with job_id 'batch')."""
    path = request.scope["path"]
    literal: set[str] = set()
    methods: set[str] = set()
    for route in request.app.routes:
        pattern, taken = getattr(route, "path_regex", None), getattr(route, "methods", None)
        if pattern is not None and taken and pattern.match(path):
            methods |= set(taken)
            if getattr(route, "path", None) == path:
                literal |= set(taken)
    return sorted(literal or methods)


async def _supervise(name: str, period: float, work: Any) -> None:
    """Run ``work`` every ``period`` seconds; a failure is logged and the loop goes on (a
    database outage is logged once, by the engine's health, not at every turn)."""
    while True:
        try:
            await work()
        except asyncio.CancelledError:
            raise
        except db.DatabaseUnavailable as exc:
            log.debug("background task %s: %s", name, exc.detail)
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


DOCS_ASSETS = "/docs/assets"


def _serve_docs(app: FastAPI) -> None:
    """``/docs`` with Swagger UI's files served by the hub itself (from the fastapi-offline
    package): FastAPI's default page loads them from a CDN, so a hub without internet showed
    an empty page. ReDoc is off (``redoc_url=None``)."""
    import fastapi_offline

    static = Path(fastapi_offline.__file__).parent / "static"
    app.mount(DOCS_ASSETS, StaticFiles(directory=static), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - API",
            swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            oauth2_redirect_url=None)


def create_app(hub: Hub) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        reaper = jobs.Reaper(hub.engine)

        async def reap() -> None:
            """HW-1: an expired lease is a failed activation; wake the group for the retry."""
            for account_id, group in await reaper():
                hub.dispatcher.wake(f"g:{account_id}:{group}")

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

    app = FastAPI(title="Outpost hub", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, responses=errors(*COMMON_ERRORS))
    app.state.hub = hub
    _serve_docs(app)
    openapi.json_errors(app)

    app.add_middleware(edge.Edge, limits=lambda: hub.config.body_limits,
                       checks=auth.caller_checks(hub.engine, hub.vault),
                       render=lambda exc: _error_response(hub, exc))
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
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err = OutpostError("not_found", "No such API path.",
                               fix="See /openapi.json for the paths this hub serves.")
        elif exc.status_code == 405:
            # Allow (RFC 9110) names every method of the path: the router's own header names
            # only those of the first route that matched it.
            allowed = ", ".join(_methods_of(request))
            exc.headers = {**(exc.headers or {}), "Allow": allowed}
            err = OutpostError("method_not_allowed", f"{request.method} is not allowed on "
                               f"{request.url.path}; it takes {allowed or 'other methods'}.",
                               fix=f"Send {allowed or 'a method /openapi.json names'} instead.",
                               allowed=allowed)
            return JSONResponse(err.to_body(), status_code=405, headers=exc.headers)
        else:  # 400: FastAPI could not read the body as JSON
            err = OutpostError("invalid_request", f"The request body could not be read: "
                               f"{exc.detail}.", fix="Send a JSON object, encoded as UTF-8, with "
                               "Content-Type: application/json.", status=exc.status_code)
            return JSONResponse(err.to_body(), status_code=exc.status_code,
                                headers=exc.headers)
        return _error_response(hub, err)

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
    @app.get("/healthz", tags=["hub"], response_model=None, responses=ok(m.Health))
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "hub_time": time.time(),
                "min_agent_version": hub.config.min_agent_version}

    @app.get("/metrics", tags=["hub"], response_class=PlainTextResponse)
    async def metrics() -> Response:
        try:
            counts = await machines.counts_by_status(hub.engine)
        except db.DatabaseUnavailable:
            pass  # the rest still tells, and the outage is in outpost_database_failures
        else:
            for state in ("Pending", "Healthy", "Unresponsive", "Disconnected", "Stopped"):
                hub.machines.labels(state).set(counts.get(state, 0))
        try:
            await hub.job_metrics.refresh(hub.engine)
        except db.DatabaseUnavailable:
            pass  # the jobs' gauges keep the last values read
        return Response(generate_latest(hub.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/ca", tags=["hub"], response_class=PlainTextResponse)
    async def ca() -> Response:
        """The hub's CA certificate; agents compare its fingerprint with the pinned one."""
        return PlainTextResponse(hub.ca_pem, headers={"X-Outpost-CA-Fingerprint":
                                                      hub.ca_fingerprint})

    # --- agents -------------------------------------------------------------------------
    @app.post("/v1/agent/register", tags=["agent"], status_code=201, responses=errors(426),
              dependencies=[openapi.ACCOUNT_SIGNED])
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

    @app.post("/v1/agent/deregister", tags=["agent"], responses=errors(426),
              dependencies=[openapi.MACHINE_SIGNED])
    async def deregister(request: Request) -> dict[str, Any]:
        row, _ = await signed_machine(request)
        await machines.deregister(hub.engine, row.id)
        return {"machine_id": row.id, "deregistered": True}

    @app.get("/v1/agent/registration", tags=["agent"], responses=errors(426),
              dependencies=[openapi.MACHINE_SIGNED])
    async def registration(request: Request) -> dict[str, Any]:
        """This machine's registration as the hub holds it: an agent whose cached copy is
        corrupt fetches it again (HW-9)."""
        row, _ = await signed_machine(request)
        return {"machine_id": row.id, "account_id": row.account_id, "name": row.name,
                "group": row.group_name, "labels": row.labels,
                "registered_at": row.registered_at}

    @app.post("/v1/agent/heartbeat", tags=["agent"], responses=errors(426),
              dependencies=[openapi.MACHINE_SIGNED])
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

    @app.post("/v1/agent/stopping", tags=["agent"], responses=errors(426),
              dependencies=[openapi.MACHINE_SIGNED])
    async def stopping(request: Request) -> dict[str, Any]:
        """The agent is stopping gracefully: the machine shows Stopped until its next
        heartbeat (a machine that dies silently turns Unresponsive after missed ones)."""
        row, _ = await signed_machine(request)
        now = await machines.record_stop(hub.engine, row.id)
        log.info("machine %s (%s) is stopping", row.name, row.id)
        return {"machine_id": row.id, "stopped_at": now}

    @app.post("/v1/agent/poll", tags=["agent"], responses=errors(426),
              dependencies=[openapi.MACHINE_SIGNED])
    async def poll(request: Request,
                   wait: Annotated[float, Query(ge=0, le=300)] = 25.0,
                   capacity: Annotated[int, Query(ge=0, le=256)] = 0) -> dict[str, Any]:
        """Hold until work for this machine appears.

        ``capacity`` is how many jobs the agent runs at once (0 while it takes none); the
        jobs the hub sees it holding count against it.
        """
        row, _ = await signed_machine(request)
        with hub.job_metrics.long_polls.track_inprogress():
            items = await hub.dispatcher.poll(row, min(wait, hub.config.poll_timeout),
                                              capacity=capacity, gone=request.is_disconnected)
        hub.job_metrics.claimed(items, time.time())
        await job_identity.add_tokens(hub.engine, hub.vault, items)
        return {"items": items}

    def _bound_records(count: int) -> None:
        most = hub.config.body_limits.report_records
        if count > most:
            raise OutpostError(
                "body_too_large", f"The request carries {count} output records; the hub "
                f"takes at most {most} in one request.", fix="Send the records in several "
                "requests (the agent sends at most about 1 MiB at a time), or raise "
                "body_limits.report_records in the hub's hub.yaml.", records=count, limit=most)

    async def _agent_body(request: Request, model: type[Any]) -> tuple[Any, Any]:
        row, body = await signed_machine(request)
        try:
            return row, model.model_validate_json(body or b"{}")
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from exc

    @app.post("/v1/agent/jobs/{job_id}/report", tags=["agent"], responses=errors(426),
              dependencies=[openapi.MACHINE_SIGNED])
    async def job_report(request: Request, job_id: str) -> dict[str, Any]:
        """One attempt's news, in order: its process started, output records, its end."""
        row, body = await _agent_body(request, JobReport)
        _bound_records(len(body.records))
        status = await jobs.report(
            hub.engine, row.id, job_id, body.attempt, started=body.started,
            records=body.records, end=body.end.model_dump() if body.end else None)
        hub.job_metrics.reported(1, len(body.records))
        if body.end is not None:
            # The machine's slot is free: its waiting long-poll claims again at once.
            hub.dispatcher.wake(f"m:{row.id}")
            if status == "Queued":  # a failed activation: any machine of the group retries
                hub.dispatcher.wake(f"g:{row.account_id}:{row.group_name}")
        return {"id": job_id, "status": status}

    @app.post("/v1/agent/reports", tags=["agent"], responses=errors(426),
              dependencies=[openapi.MACHINE_SIGNED])
    async def job_reports(request: Request) -> dict[str, Any]:
        """Several attempts' reports in one transaction (each as ``/jobs/{id}/report``
        takes it), and in the answer the jobs claimed for the slots they freed: an agent
        that runs many short jobs needs neither a request per job nor a long-poll answer
        per freed slot."""
        row, body = await _agent_body(request, JobReports)
        _bound_records(sum(len(r.records) for r in body.reports))
        # Not model_dump(): it would copy every record again.
        results, items = await jobs.report_many(hub.engine, row, [
            {"job_id": r.job_id, "attempt": r.attempt, "started": r.started,
             "records": r.records, "end": r.end.model_dump() if r.end else None}
            for r in body.reports], body.claim)
        taken = [r for r, res in zip(body.reports, results, strict=True) if "error" not in res]
        hub.job_metrics.reported(len(taken), sum(len(r.records) for r in taken))
        hub.job_metrics.claimed(items, time.time())
        if any(r.end is not None for r in body.reports) and not items:
            # Nothing was claimed here (no capacity given, or no job queued): the waiting
            # long-poll looks again, for work items too.
            hub.dispatcher.wake(f"m:{row.id}")
        if any(r.get("status") == "Queued" for r in results):
            hub.dispatcher.wake(f"g:{row.account_id}:{row.group_name}")
        await job_identity.add_tokens(hub.engine, hub.vault, items)
        return {"results": results, "items": items}

    @app.post("/v1/agent/jobs/{job_id}/paused", tags=["agent"], responses=errors(426),
              dependencies=[openapi.MACHINE_SIGNED])
    async def job_paused(request: Request, job_id: str) -> dict[str, Any]:
        row, body = await _agent_body(request, JobAttempt)
        return {"id": job_id, "status": await jobs.paused(hub.engine, row.id, job_id,
                                                          body.attempt)}

    @app.post("/v1/agent/work/{item_id}/done", tags=["agent"], responses=errors(426),
              dependencies=[openapi.MACHINE_SIGNED])
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
    @app.get("/v1/whoami", tags=["operator"], response_model=None,
             responses=ok(m.Whoami))
    async def whoami(principal: Op) -> dict[str, Any]:
        return {"account_id": principal.account_id, "admin": principal.admin}

    @app.get("/v1/accounts", tags=["operator"], response_model=None,
             responses=ok(list[m.AccountView]))
    async def account_list(principal: Op) -> list[dict[str, Any]]:
        return await accounts.listing(hub.engine, principal)

    @app.post("/v1/accounts", tags=["operator"], status_code=201, response_model=None,
              responses=ok(m.AccountCreated, 201))
    async def account_create(principal: Op, body: AccountCreate) -> dict[str, str]:
        if not principal.admin:
            raise OutpostError("admin_required")
        return await accounts.create(hub.engine, hub.vault, body.name)

    @app.get("/v1/accounts/{account_id}/keys", tags=["operator"], response_model=None,
             responses=ok(m.AccountKeys))
    async def account_keys(principal: Op, account_id: str) -> dict[str, str]:
        return await accounts.keys(hub.engine, hub.vault, principal, account_id)

    @app.post("/v1/accounts/{account_id}/keys/{which}/regenerate", tags=["operator"],
              response_model=None, responses=ok(m.AccountKeys))
    async def account_regenerate(principal: Op, account_id: str, which: str) -> dict[str, str]:
        return await accounts.regenerate(hub.engine, hub.vault, principal, account_id, which)

    @app.get("/v1/machines", tags=["operator"], response_model=None,
             responses=ok(list[m.MachineView]))
    async def machine_list(principal: Op) -> list[dict[str, Any]]:
        return await machines.listing(hub.engine, principal.account_id)

    @app.get("/v1/heartbeats", tags=["operator"], response_model=None,
             responses=ok(list[m.MachineHeartbeat]))
    async def machine_heartbeats(principal: Op) -> list[dict[str, Any]]:
        return await machines.heartbeats(hub.engine, principal.account_id)

    @app.get("/v1/machines/{name}", tags=["operator"], response_model=None,
             responses=ok(m.MachineView))
    async def machine_show(principal: Op, name: str) -> dict[str, Any]:
        row = await machines.find(hub.engine, principal.account_id, name)
        return machines.view(row, time.time())

    @app.delete("/v1/machines/{name}", tags=["operator"], response_model=None,
                responses=ok(m.MachineRemoved))
    async def machine_remove(principal: Op, name: str) -> dict[str, Any]:
        row = await machines.find(hub.engine, principal.account_id, name)
        await machines.deregister(hub.engine, row.id)
        return {"name": row.name, "removed": True}

    @app.post("/v1/machines/{name}/ping", tags=["operator"], response_model=None,
              responses=ok(m.PingResult) | errors(504))
    async def machine_ping(principal: Op, name: str,
                           timeout: Annotated[str, Query(
                               max_length=64, description="A duration: 10, 10s, 1m; at "
                               "most 2 minutes.")] = "10"
                           ) -> dict[str, Any]:
        """Send a work item to one machine and wait until its agent answers it."""
        wait = durations.parse(timeout, "timeout", positive=True, maximum=120)
        row = await machines.find(hub.engine, principal.account_id, name)
        started = time.time()
        item_id = await hub.dispatcher.submit(row.account_id, "ping", {"sent_at": started},
                                              machine_id=row.id)
        done = await hub.dispatcher.wait_done(item_id, wait)
        if done is None:
            await hub.dispatcher.withdraw(item_id)
            raise OutpostError("ping_timeout",
                               f"Machine '{row.name}' did not answer the ping within "
                               f"{wait:g} s.", machine=row.name)
        return {"machine": row.name, "round_trip_ms": round((done["done_at"] - started) * 1e3, 2),
                "agent_received_at": done["result"].get("received_at")}

    @app.post("/v1/runbooks", tags=["runbooks"], status_code=201, response_model=None,
              responses=ok(m.RunbookPublished, 201, "A new version was stored.")
              | ok(m.RunbookPublished, 200, "The same as the latest version: nothing was "
                   "stored (\"unchanged\": true)."))
    async def runbook_publish(principal: Op, body: RunbookPublish,
                              response: Response) -> dict[str, Any]:
        """Store a new version of a runbook (201). The same content, type, description,
        parameters and switches as the latest version store nothing: 200 with that version
        and ``"unchanged": true``."""
        stored = await runbooks.publish(
            hub.engine, principal.account_id, body.name, body.content, kind=body.type,
            filename=body.filename, description=body.description, param_specs=body.params,
            log_verbose=body.log_verbose, log_progress=body.log_progress)
        if stored["unchanged"]:
            response.status_code = 200
        return stored

    @app.get("/v1/runbooks", tags=["runbooks"], response_model=None,
             responses=ok(list[m.RunbookListed]))
    async def runbook_list(principal: Op) -> list[dict[str, Any]]:
        return await runbooks.listing(hub.engine, principal.account_id)

    @app.delete("/v1/runbooks/{name}", tags=["runbooks"], response_model=None,
                responses=ok(m.RunbookRemoved))
    async def runbook_remove(principal: Op, name: str) -> dict[str, Any]:
        """Remove every version of a runbook; refused (409, E8041) while a schedule, a
        webhook or an unfinished job uses it. Jobs it ran keep their history."""
        return await runbooks.remove(hub.engine, principal.account_id, name)

    @app.get("/v1/runbooks/{name}", tags=["runbooks"], response_model=None,
             responses=ok(m.RunbookVersion))
    async def runbook_show(principal: Op, name: str,
                           version: Annotated[int | None, Query(ge=1, le=INT32_MAX)] = None
                           ) -> dict[str, Any]:
        return await runbooks.get(hub.engine, principal.account_id, name, version)

    @app.post("/v1/jobs", tags=["jobs"], status_code=201, response_model=None,
              responses=ok(m.JobStarted, 201))
    async def job_start(principal: Op, body: JobStart) -> dict[str, Any]:
        """Queue a job; parameters are checked first, so a bad one queues nothing."""
        job = await jobs.start(hub.engine, principal.account_id, body.runbook, body.group,
                               body.params, body.version, body.timeout)
        hub.dispatcher.wake(f"g:{principal.account_id}:{body.group}")
        warnings = await groups.unknown_group_warnings(hub.engine, principal.account_id,
                                                       [body.group])
        return {**job, "warnings": warnings}

    @app.post("/v1/jobs/batch", tags=["jobs"], status_code=201, response_model=None,
              responses=ok(m.JobBatchResult, 201))
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
        named = list(dict.fromkeys(view["group_name"] for view in views))
        for group in named:
            hub.dispatcher.wake(f"g:{principal.account_id}:{group}")
        warnings = await groups.unknown_group_warnings(hub.engine, principal.account_id,
                                                       named)
        return {"jobs": views, "warnings": warnings}

    async def job_control(principal: accounts.Principal, job_id: str,
                          action: str) -> dict[str, Any]:
        """Stop, suspend or resume a job; a machine that holds it is told at once."""
        job_id = await jobs.resolve(hub.engine, principal.account_id, job_id)
        job, machine_id = await jobs.control(hub.engine, principal.account_id, job_id, action)
        if machine_id is not None:
            await hub.dispatcher.submit(principal.account_id, "job_control",
                                        {"job_id": job_id, "attempt": job["attempt"],
                                         "action": action}, machine_id=machine_id)
        elif job["status"] == "Queued":
            hub.dispatcher.wake(f"g:{principal.account_id}:{job['group_name']}")
        return job

    # A route per action rather than /{action}: POST /v1/jobs/ID/output must answer 405
    # (that path takes GET), not 422 for an unknown action.
    @app.post("/v1/jobs/{job_id}/stop", tags=["jobs"], response_model=None,
              responses=ok(m.JobDetail))
    async def job_stop(principal: Op, job_id: str) -> dict[str, Any]:
        """Stop a job: its process group is ended on the machine that runs it."""
        return await job_control(principal, job_id, "stop")

    @app.post("/v1/jobs/{job_id}/suspend", tags=["jobs"], response_model=None,
              responses=ok(m.JobDetail))
    async def job_suspend(principal: Op, job_id: str) -> dict[str, Any]:
        """Suspend a job: its process group is paused where it runs, or it waits queued."""
        return await job_control(principal, job_id, "suspend")

    @app.post("/v1/jobs/{job_id}/resume", tags=["jobs"], response_model=None,
              responses=ok(m.JobDetail))
    async def job_resume(principal: Op, job_id: str) -> dict[str, Any]:
        """Resume a suspended job."""
        return await job_control(principal, job_id, "resume")

    @app.get("/v1/groups", tags=["groups"], response_model=None,
             responses=ok(list[m.GroupListed]))
    async def group_list(principal: Op) -> list[dict[str, Any]]:
        """The account's groups: those with machines and those with settings."""
        return await groups.listing(hub.engine, principal.account_id)

    @app.put("/v1/groups/{name}", tags=["groups"], response_model=None,
             responses=ok(m.GroupView))
    async def group_set(principal: Op, name: str, body: GroupSettings) -> dict[str, Any]:
        return await groups.configure(hub.engine, principal.account_id, name,
                                      body.model_dump(include=body.model_fields_set))

    @app.get("/v1/jobs", tags=["jobs"], response_model=None,
             responses=ok(list[m.JobView]))
    async def job_list(principal: Op, status: str | None = None,
                       limit: Annotated[int, Query(ge=1, le=10000)] = 200
                       ) -> list[dict[str, Any]]:
        """The newest jobs first."""
        return await jobs.listing(hub.engine, principal.account_id, status, limit)

    @app.get("/v1/jobs/{job_id}", tags=["jobs"], response_model=None,
             responses=ok(m.JobDetail))
    async def job_show(principal: Op, job_id: str) -> dict[str, Any]:
        if job_id == "batch":  # POST /v1/jobs/batch's path: another method answers 405
            raise StarletteHTTPException(405)
        job_id = await jobs.resolve(hub.engine, principal.account_id, job_id)
        return await jobs.get(hub.engine, principal.account_id, job_id)

    @app.get("/v1/jobs/{job_id}/output", tags=["jobs"], response_model=None,
             responses=ok(list[m.RecordView]))
    async def job_output(principal: Op, job_id: str,
                         after: Annotated[int, Query(ge=-1, le=INT64_MAX)] = -1,
                         stream: Annotated[list[str] | None, Query()] = None,
                         limit: Annotated[int, Query(ge=1, le=50000)] = 10000
                         ) -> list[dict[str, Any]]:
        """A page of the job's output records after sequence ``after``, in order."""
        job_id = await jobs.resolve(hub.engine, principal.account_id, job_id)
        return await jobs.records(hub.engine, principal.account_id, job_id, after, stream,
                                  limit)

    asset_routes.add_routes(app, hub)
    fanout_routes.add_routes(app, hub)
    scheduler = schedule_routes.add_routes(app, hub)
    agent_dist_routes.add_routes(app, hub)
    return app
