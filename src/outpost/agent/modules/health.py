"""A module's health probe, run once: a command (its exit status, as the module's user, in
its own session, killed with its children at the timeout) or an HTTP GET on loopback (a 2xx
or 3xx answer). The supervisor runs it every ``interval_seconds`` and counts failures in a
row after ``start_period_seconds`` (supervisor.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from urllib.parse import urlsplit

from outpost.protocol.modreaders import HealthProbe

OUTPUT_LIMIT = 400  # characters of a failing command's output kept for the reason


async def probe(spec: HealthProbe, env: dict[str, str],
                preexec: Callable[[], None] | None = None) -> tuple[bool, str]:
    """(healthy, why not)."""
    if spec.command is not None:
        return await _command(spec.command, spec.timeout_seconds, env, preexec)
    assert spec.http is not None
    return await _http(spec.http, spec.timeout_seconds)


async def _command(argv: list[str], timeout: float, env: dict[str, str],
                   preexec: Callable[[], None] | None) -> tuple[bool, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True,
            preexec_fn=preexec)
    except OSError as exc:
        return False, f"the probe command {argv[0]} could not be started: {exc.strerror or exc}"
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except (TimeoutError, asyncio.TimeoutError):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            await proc.wait()
        return False, f"the probe command did not end within {timeout:g} s"
    if proc.returncode == 0:
        return True, ""
    text = out.decode("utf-8", "replace").strip()[-OUTPUT_LIMIT:]
    said = f": {text}" if text else ""
    return False, f"the probe command exited with {proc.returncode}{said}"


async def _http(url: str, timeout: float) -> tuple[bool, str]:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\n"
                         "User-Agent: outpost-health\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            line = await reader.readline()
    except (TimeoutError, asyncio.TimeoutError):
        return False, f"GET {url} did not answer within {timeout:g} s"
    except OSError as exc:
        return False, f"GET {url} failed: {exc.strerror or exc}"
    finally:
        if writer is not None:
            writer.close()
    fields = line.decode("latin-1", "replace").split()
    if len(fields) < 2 or not fields[1].isdigit():
        return False, f"GET {url} answered something that is not HTTP"
    status = int(fields[1])
    if 200 <= status < 400:
        return True, ""
    return False, f"GET {url} answered {status}"
