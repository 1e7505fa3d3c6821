"""What the agent tells the hub about its machine."""

from __future__ import annotations

import os
import platform
import socket
import time
from pathlib import Path
from typing import Any

import psutil

from outpost import __version__

# Plain dicts, validated by the hub against outpost.protocol.models: the agent does not load
# pydantic, to stay within its memory budget.


def machine_facts() -> dict[str, Any]:
    return dict(
        hostname=socket.gethostname(),
        os=platform.system(),
        os_release=platform.release(),
        arch=platform.machine(),
        agent_version=__version__,
        cpu_count=os.cpu_count() or 1,
        memory_bytes=psutil.virtual_memory().total,
    )


def heartbeat(state_dir: Path, started: float, interval: float, running_jobs: int = 0,
              not_taking_work: str | None = None) -> dict[str, Any]:
    mem = psutil.virtual_memory()
    disk = psutil.disk_usage(str(state_dir))
    return dict(
        agent_version=__version__,
        uptime_seconds=round(time.time() - started, 3),
        load1=os.getloadavg()[0],
        cpu_percent=psutil.cpu_percent(interval=None),
        memory_percent=mem.percent,
        memory_used_bytes=mem.total - mem.available,
        disk_free_bytes=disk.free,
        disk_percent=disk.percent,
        heartbeat_interval=interval,
        running_jobs=running_jobs,
        not_taking_work=not_taking_work,
    )
