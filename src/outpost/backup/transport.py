"""How restic reaches a machine's repository on the hub: directly, or through the bridge.

restic 0.17 and later read a REST backend's credentials from ``RESTIC_REST_USERNAME`` and
``RESTIC_REST_PASSWORD``, so restic speaks to ``<hub>/v1/backup/<machine id>/`` itself
(``rest:`` with ``--cacert``), the machine id as user name and the token as password (HTTP
Basic), and no secret is in the URL. Older restic can send credentials only inside the URL,
which the hub refuses; it goes through ``outpost-restic-bridge`` (its rclone backend), which
adds the token as a header. Each byte then passes one more process, so ``auto`` takes the
direct path whenever restic allows it (docs/backup.md, "How restic connects").

The choice (``transport``): ``auto`` (the default), ``direct`` (refused with an older
restic: it would send no credentials) or ``bridge`` (works with any restic).
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

TRANSPORTS = ("auto", "direct", "bridge")
DIRECT_SINCE = (0, 17, 0)
_VERSION = re.compile(r"\brestic\s+v?(\d+)\.(\d+)(?:\.(\d+))?")

Version = tuple[int, int, int]


class TransportError(ValueError):
    """A transport that is not one of TRANSPORTS, or ``direct`` with a restic too old."""


def parse_version(text: str) -> Version | None:
    """restic's version from what ``restic version`` prints (``restic 0.18.0 compiled with
    go1.24.4 on linux/amd64``; a build of a development tree says ``0.17.3-dev``)."""
    match = _VERSION.search(text)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def restic_version(program: str, timeout: float = 60.0) -> Version | None:
    """The version of the restic at ``program`` (None when it does not say)."""
    try:
        done = subprocess.run([program, "version"], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_version(done.stdout) if done.returncode == 0 else None


def shown(version: Version | None) -> str:
    return "an unknown version" if version is None else ".".join(map(str, version))


def choose(setting: str | None, version: Version | None) -> str:
    """``direct`` or ``bridge`` for restic ``version`` and the ``transport`` setting (None
    or empty: auto). A restic whose version cannot be read is taken as too old."""
    wanted = (setting or "auto").strip().lower()
    if wanted not in TRANSPORTS:
        raise TransportError(f"transport must be one of {', '.join(TRANSPORTS)} (got "
                             f"{setting!r})")
    new_enough = version is not None and version >= DIRECT_SINCE
    if wanted == "direct" and not new_enough:
        raise TransportError(f"transport 'direct' needs restic 0.17.0 or later (this restic "
                             f"is {shown(version)}); install a newer restic or use "
                             "transport 'bridge' or 'auto'")
    if wanted == "auto":
        return "direct" if new_enough else "bridge"
    return wanted


@dataclass(frozen=True)
class Connection:
    """restic's repository arguments and the environment that carries the token."""

    args: list[str]
    env: dict[str, str]


def connection(transport: str, hub: str, machine_id: str, ca_file: str, token: str,
               bridge: Sequence[str]) -> Connection:
    """How restic opens ``machine_id``'s repository on ``hub``: ``direct`` (restic's REST
    backend, the token as HTTP Basic's password from its environment) or ``bridge``
    (``bridge`` is the command that starts the bridge; the token in OUTPOST_BACKUP_TOKEN).
    The token is never an argument."""
    base = hub.rstrip("/")
    if transport == "direct":
        return Connection(["-r", f"rest:{base}/v1/backup/{machine_id}/", "--cacert", ca_file],
                          {"RESTIC_REST_USERNAME": machine_id, "RESTIC_REST_PASSWORD": token})
    if transport != "bridge":
        raise TransportError(f"not a transport: {transport!r}")
    command = [*bridge, "--hub", base, "--machine-id", machine_id, "--ca-file", ca_file]
    return Connection(["-r", "rclone:outpost", "-o", f"rclone.program={shlex.quote(command[0])}",
                       "-o", "rclone.args=" + shlex.join(command[1:])],
                      {"OUTPOST_BACKUP_TOKEN": token})
