"""The hub's ASGI application, assembled: middleware, error handlers, the lifespan (the
background tasks) and the routers of ``hub/routes``."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import Counter

from outpost import __version__
from outpost.common.supervise import Supervisor
from outpost.protocol.errors import OutpostError

from . import auth, db, dispatcher, edge, gcwatch, idempotency, jobs, openapi, routes
from .routes import lean
from .routes.deps import COMMON_ERRORS, errors
from .routes.hub import serve_docs
from .state import Hub

__all__ = ["Hub", "create_app", "errors"]

log = logging.getLogger("outpost.hub")


def _error_response(hub: Hub | None, exc: OutpostError) -> JSONResponse:
    if hub is not None and exc.entry.http_status in (401, 403):
        hub.refusals.labels(exc.reason).inc()
    headers = ({"Retry-After": str(exc.retry_after)}
               if isinstance(exc, db.DatabaseUnavailable) else None)
    return JSONResponse(exc.to_body(), status_code=exc.entry.http_status, headers=headers)


def _hub(request: Request) -> Hub:
    found: Hub = request.app.state.hub
    return found


def _methods_of(request: Request) -> list[str]:
    """The methods of every route of this path; only the literal routes' where one is
    literal (POST /v1/jobs/batch, not GET /v1/jobs/{job_id} with job_id 'batch')."""
    path = request.scope["path"]
    literal: set[str] = set()
    methods: set[str] = set()
    # The routers' own routes too: a FastAPI that includes a router lazily lists it as one
    # entry of app.routes, not as its routes.
    every = [*request.app.routes, *(r for router in routes.ROUTERS for r in router.routes)]
    for route in every:
        pattern, taken = getattr(route, "path_regex", None), getattr(route, "methods", None)
        if pattern is not None and taken and pattern.match(path):
            methods |= set(taken)
            if getattr(route, "path", None) == path:
                literal |= set(taken)
    return sorted(literal or methods)


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


# --- error handlers: every error is an ErrorBody with its code --------------------------
async def _outpost_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OutpostError)
    return _error_response(_hub(request), exc)


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = [{"field": ".".join(str(p) for p in e.get("loc", ())), "problem": e["msg"]}
                for e in exc.errors()]
    first = problems[0] if problems else {"field": "?", "problem": "invalid"}
    err = OutpostError("invalid_request",
                       f"The request is not valid: {first['field']}: {first['problem']}.",
                       problems=problems)
    return _error_response(_hub(request), err)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
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
        return JSONResponse(err.to_body(), status_code=exc.status_code, headers=exc.headers)
    return _error_response(_hub(request), err)


async def _db_refused(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DBAPIError)
    # PostgreSQL cannot store the NUL character in text; that is bad input, not a crash.
    if "0x00" in str(exc.orig):
        return _error_response(_hub(request), OutpostError(
            "invalid_request", "A text value contains the NUL character (\\u0000), which "
            "the hub's database cannot store.", fix="Remove the NUL character and send the "
            "request again."))
    return await _crashed(request, exc)


async def _crashed(request: Request, exc: Exception) -> JSONResponse:
    request_id = uuid.uuid4().hex[:12]
    log.exception("request %s failed", request_id, exc_info=exc)
    return _error_response(_hub(request), OutpostError("internal_error",
                                                       request_id=request_id))


# --- background tasks -------------------------------------------------------------------
@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    hub: Hub = app.state.hub
    reaper = jobs.Reaper(hub.engine)

    async def reap() -> None:
        await reaper()  # HW-1 (it wakes the groups of the jobs it queues again)

    async def prune_nonces() -> None:
        await auth.prune_nonces(hub.engine)
        await idempotency.prune(hub.engine)

    await hub.notifier.start()
    await hub.leadership.start()
    hub.scheduler.follow(hub.leadership)
    # A database outage is logged once, by the engine's health, not at every turn.
    tasks = hub.tasks = Supervisor(log, quiet=(db.DatabaseUnavailable,))
    tasks.start("prune-nonces", prune_nonces, period=60.0)
    tasks.start("reap-leases", reap, period=1.0)
    # Work whose notification was lost (dispatcher.py): found within RECHECK seconds.
    tasks.start("catch-up", hub.dispatcher.catch_up, period=dispatcher.RECHECK)
    tasks.start("scheduler", hub.scheduler.run, backoff_cap=5.0)
    # Extension operations: start timeouts (EX-1), retries (EX-12), the next in line.
    tasks.start("extension-operations", hub.ext_ops.tick, period=1.0)
    # Recovery points at each protection's interval, and failover/failback steps.
    tasks.start("recovery", hub.recovery.tick, period=1.0)
    tasks.start("loop-lag", hub.loop_lag.run)
    if hub.gc_freezer is not None:
        tasks.start("gc-young", hub.gc_freezer.collect_young, period=gcwatch.YOUNG_EVERY)
    # Upstream messages: retention and forwarding, each on the leading replica only.
    tasks.start("messages-retention", hub.messages.retain, period=60.0)
    if hub.messages.forwarder is not None:
        tasks.start("messages-forward", hub.messages.forwarder.run, backoff_cap=5.0)
    checkpointer = getattr(hub.engine, "checkpointer", None)
    if checkpointer is not None:  # SQLite's log, checkpointed off the event loop
        tasks.start("wal-checkpoint", checkpointer.run)
    try:
        yield
    finally:
        await hub.notifier.close()
        await tasks.stop()
        await hub.leadership.close()
        await hub.engine.dispose()
        if checkpointer is not None:
            checkpointer.close()


def create_app(hub: Hub, *, lean_routes: bool = True) -> FastAPI:
    """The hub's ASGI app (``lean_routes=False``: every request through the framework, for
    benchmarks that compare the two)."""
    app = FastAPI(title="Outpost hub", version=__version__, lifespan=_lifespan,
                  docs_url=None, redoc_url=None, responses=errors(*COMMON_ERRORS))
    app.state.hub = hub
    # A path with a trailing slash is another path: answered 404 with a catalog error, not
    # a bare 307 to the path without it (an asset named '0/' came back as an empty 307).
    app.router.redirect_slashes = False
    serve_docs(app)
    openapi.json_errors(app)

    app.add_middleware(edge.Edge, limits=lambda: hub.config.body_limits,
                       checks=auth.caller_checks(hub.engine, hub.vault),
                       render=lambda exc: _error_response(hub, exc),
                       lean=lean.ROUTES if lean_routes else None)
    app.add_middleware(CountRequests, counter=hub.requests)

    app.add_exception_handler(OutpostError, _outpost_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(DBAPIError, _db_refused)
    app.add_exception_handler(Exception, _crashed)
    for router in routes.ROUTERS:
        app.include_router(router)
    return app
