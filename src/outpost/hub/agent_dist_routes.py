"""Routes that hand out the agent: its install script and its wheel (see hub/install.py).

Public like ``/v1/ca``: neither holds a secret, and a machine that runs them has no key yet.
The line that fetches them pins the hub's CA, so what they say is what this hub sent.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.responses import FileResponse, PlainTextResponse, Response

from . import install

if TYPE_CHECKING:
    from .app import Hub


class _Wheel:
    """The agent's wheel, built at the first request and kept for the process's life."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path: Path | None = None
        self.lock = asyncio.Lock()

    async def get(self) -> Path:
        async with self.lock:
            if self.path is None:
                self.path = await asyncio.to_thread(install.cached_wheel, self.directory)
            return self.path


class ShellScript(PlainTextResponse):
    media_type = "text/x-shellscript"


def add_routes(app: FastAPI, hub: Hub) -> None:
    wheel = _Wheel(hub.paths.root / "agent-dist")
    responses: dict[int | str, dict[str, object]] = {
        503: {"description": "The hub cannot build the agent's wheel (E8020)."}}

    @app.get(install.SCRIPT_PATH, tags=["agent"], response_class=ShellScript,
             responses=responses)
    async def agent_install_script() -> Response:
        """The POSIX sh script that installs the agent, registers the machine and sets up
        its service; run it with the line 'outpost machine install-line' prints."""
        path = await wheel.get()
        return ShellScript(install.install_script(path.name))

    @app.get(install.WHEEL_ALIAS, tags=["agent"], response_class=FileResponse,
             responses=responses)
    async def agent_wheel_latest() -> Response:
        """The agent's wheel, whatever its version (the file name says it)."""
        path = await wheel.get()
        return FileResponse(path, media_type="application/zip", filename=path.name)

    @app.get(f"/v1/agent/{install.agent_wheel_name()}", tags=["agent"],
             response_class=FileResponse, responses=responses)
    async def agent_wheel() -> Response:
        """The agent's wheel under its own name (outpost_fleet-VERSION-py3-none-any.whl)."""
        path = await wheel.get()
        return FileResponse(path, media_type="application/zip", filename=path.name)
