"""The hub's public routes: health, metrics, its CA certificate, the API's documentation
page, and the agent it hands out (install script and wheel, see hub/install.py).

None takes a credential: none holds a secret, and a machine that fetches the agent has no
key yet. The line that fetches the agent pins the hub's CA, so what it gets is what this hub
sent.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from outpost import __version__
from outpost.protocol import models as m

from .. import db, install, machines
from ..openapi import ok
from .deps import HubDep

router = APIRouter()
DOCS_ASSETS = "/docs/assets"


@router.get("/healthz", tags=["hub"], response_model=None, responses=ok(m.Health))
async def healthz(hub: HubDep) -> dict[str, Any]:
    return {"status": "ok", "version": __version__, "hub_time": time.time(),
            "min_agent_version": hub.config.min_agent_version,
            "scheduler": hub.leadership.role, "notifications": hub.notifier.state}


@router.get("/metrics", tags=["hub"], response_class=PlainTextResponse)
async def metrics(hub: HubDep) -> Response:
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


@router.get("/v1/ca", tags=["hub"], response_class=PlainTextResponse)
async def ca(hub: HubDep) -> Response:
    """The hub's CA certificate; agents compare its fingerprint with the pinned one."""
    return PlainTextResponse(hub.ca_pem, headers={"X-Outpost-CA-Fingerprint":
                                                  hub.ca_fingerprint})


def serve_docs(app: FastAPI) -> None:
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


# --- the agent, handed out --------------------------------------------------------------
class ShellScript(PlainTextResponse):
    media_type = "text/x-shellscript"


dist = APIRouter()
_DIST_ERRORS: dict[int | str, dict[str, Any]] = {
    503: {"description": "The hub cannot build the agent's wheel (E8020)."}}


@dist.get(install.SCRIPT_PATH, tags=["agent"], response_class=ShellScript,
          responses=_DIST_ERRORS)
async def agent_install_script(hub: HubDep) -> Response:
    """The POSIX sh script that installs the agent, registers the machine and sets up
    its service; run it with the line 'outpost machine install-line' prints."""
    path = await hub.wheel.get()
    return ShellScript(install.install_script(path.name))


@dist.get(install.WHEEL_ALIAS, tags=["agent"], response_class=FileResponse,
          responses=_DIST_ERRORS)
async def agent_wheel_latest(hub: HubDep) -> Response:
    """The agent's wheel, whatever its version (the file name says it)."""
    path = await hub.wheel.get()
    return FileResponse(path, media_type="application/zip", filename=path.name)


@dist.get(f"/v1/agent/{install.agent_wheel_name()}", tags=["agent"],
          response_class=FileResponse, responses=_DIST_ERRORS)
async def agent_wheel(hub: HubDep) -> Response:
    """The agent's wheel under its own name (outpost_fleet-VERSION-py3-none-any.whl)."""
    path = await hub.wheel.get()
    return FileResponse(path, media_type="application/zip", filename=path.name)
