"""``outpost agent support-bundle``: one tar.gz with what support needs, secrets removed (EX-9).

Members, under one folder named after the machine and the time::

    README.txt              what is here and what was removed
    status.json             the agent's status, or that it is not running
    config.yaml             the config file as written, redacted
    config-effective.json   the settings the agent runs with (defaults filled in), redacted
    registration.json       machine id, account, group, hub URLs, pinned CA (no key)
    check.json              'outpost check --output json' results (or why there are none)
    versions.json           Outpost, Python, the OS, and the key packages
    environment.json        the variables that change the agent's behaviour, redacted
    state-dir.json          the state directory's files: names, sizes, modes (no content)
    joblogs.json            the index of the job logs kept on the machine (no output)
    extensions.json         each extension's state, step and message (state.json's)
    logs/agent.log[.N]      the agent's log files, every line redacted
    logs/extensions/NAME.log[.1]
                            each extension's own log (its handlers' output), redacted
    modules.json            the deployment last applied and each module's recorded process
                            (the supervisor's state file), every env value removed
    logs/modules/NAME.log   the last lines of each module's own log, redacted

Secrets never leave: the machine key is not read into the bundle at all; values of any
setting, field or variable whose name is a secret's (``token``, ``account_key``,
``password``, ``Authorization``...: whole words of the name, see ``redact.py``) become
``[redacted]``, as do values shaped like secrets (passwords in URLs, bearer tokens, private
key blocks, Outpost's API and job tokens, webhook addresses, account keys) and, anywhere in
any member, the literal values of the secrets found on the machine (the machine key's seed,
proxy passwords, the account key or API token in the environment). Ordinary words that
merely contain such a name (``PWD``, a directory ``token-tests``) are kept, paths intact.
"""

from __future__ import annotations

import io
import json
import os
import platform
import re
import socket
import stat
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from outpost import __version__
from outpost.protocol.errors import OutpostError

from . import config as agent_config
from . import joblogs, logs
from .redact import REDACTED, Redactor, is_secret_name
from .state import StateDir

PACKAGES = ("httpx", "httpcore", "cryptography", "PyNaCl", "pydantic", "PyYAML", "typer",
            "rich", "psutil", "fastapi", "uvicorn", "SQLAlchemy", "alembic", "asyncpg",
            "aiosqlite")
# Variables that change what the agent does; anything else in the environment stays out.
ENV_NAMES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY", "https_proxy",
             "http_proxy", "all_proxy", "no_proxy", "SSL_CERT_FILE", "SSL_CERT_DIR",
             "REQUESTS_CA_BUNDLE", "LANG", "LC_ALL", "TZ", "PATH", "USER", "HOME",
             "XDG_STATE_HOME", "INVOCATION_ID")
def known_secrets(state: StateDir, config_text: str | None,
                  environ: dict[str, str]) -> list[str]:
    """Secret values on this machine, to be removed wherever they turn up."""
    found: list[str] = []
    try:  # the machine key's seed, as stored and as raw text, never its file
        lines = [ln.strip() for ln in state.key_path.read_text().splitlines() if ln.strip()]
        found += [ln for ln in lines if not ln.startswith("-----")]
    except (OSError, UnicodeDecodeError):
        pass
    texts = [config_text or ""]
    for name, value in environ.items():
        if is_secret_name(name):
            found.append(value)
        texts.append(value)
    for text in texts:  # passwords and users in URLs (proxies, hub URLs)
        for match in re.finditer(r"[a-z][a-z0-9+.-]*://[^\s\"']+", text, re.I):
            parts = urlsplit(match.group(0))
            found += [p for p in (parts.password, parts.username) if p]
    return found


def _versions() -> dict[str, Any]:
    packages: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    os_release: dict[str, str] = {}
    try:
        os_release = platform.freedesktop_os_release()
    except OSError:
        pass
    return {"outpost": __version__, "python": sys.version, "executable": sys.executable,
            "platform": platform.platform(), "machine": platform.machine(),
            "os": {k: os_release[k] for k in ("NAME", "VERSION", "ID", "VERSION_ID")
                   if k in os_release},
            "packages": packages}


def _state_listing(root: Path) -> list[dict[str, Any]]:
    rows = []
    if root.is_dir():
        for path in sorted(root.rglob("*")):
            try:
                st = path.lstat()
            except OSError:
                continue
            rows.append({"path": str(path.relative_to(root)), "bytes": st.st_size,
                         "mode": stat.filemode(st.st_mode), "modified": logs.iso(st.st_mtime)})
    return rows


def _status(state: StateDir) -> dict[str, Any]:
    from .daemon import read_status

    info = read_status(state)
    if info is None:
        pid = state.running_pid()
        return {"running": False, "pid": pid, "state_dir": str(state.root),
                "note": "The agent is not running" + (
                    f" (process {pid} exists but does not answer on its status socket)"
                    if pid else "") + "; start it with "
                f"'outpost agent run --state-dir {state.root}'."}
    info["running"] = True
    return info


def _checks(state: StateDir, config_path: Path | None) -> dict[str, Any]:
    try:
        from outpost.agent import checks as agent_checks
        from outpost.protocol import checks as engine
    except ImportError as exc:
        return {"note": f"'outpost check' is not available in this version ({exc})."}
    ctx = agent_checks.AgentContext(state, config_path)
    try:
        results = agent_checks.run(ctx)
    except Exception as exc:  # the bundle is most needed when things are broken
        return {"note": f"the checks could not run: {type(exc).__name__}: {exc}"}
    return {"state_dir": str(state.root), "config_path": str(config_path or "") or None,
            "version": __version__, "exit_code": engine.exit_status(results),
            "counts": engine.counts(results), "checks": [r.to_json() for r in results]}


def _config(config_path: Path | None, red: Redactor) -> tuple[str, dict[str, Any]]:
    if config_path is None:
        return "# no config file: the agent runs with the defaults\n", {
            "config_path": None, "settings": asdict(agent_config.AgentConfig())}
    try:
        text = config_path.read_text(errors="replace")
    except OSError as exc:
        return f"# {config_path}: cannot be read: {exc}\n", {"config_path": str(config_path)}
    try:
        raw = yaml.safe_load(text)
        shown = yaml.safe_dump(red.data(raw), sort_keys=False) if isinstance(raw, dict) \
            else red.text(text)
    except yaml.YAMLError:
        shown = "\n".join(red.text(line) for line in text.splitlines()) + "\n"
    effective: dict[str, Any] = {"config_path": str(config_path)}
    try:
        effective["settings"] = red.data(asdict(agent_config.load(config_path)))
    except OutpostError as exc:
        effective["error"] = {"code": exc.code, "message": red.text(exc.message)}
    return f"# {config_path}\n{shown}", effective


def default_name(now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:40] or "machine"
    return f"outpost-support-{host}-{stamp}"


MODULE_LOG_LINES = 500


def _modules(state: StateDir) -> dict[str, Any]:
    """The supervisor's state file, each module's env values removed (a manifest's env may
    hold anything a module needs, secrets among it)."""
    from .state import CorruptFile, read_checked

    try:
        saved = read_checked(state.root / "modules" / "supervisor.json")
    except FileNotFoundError:
        return {"deployment": None, "note": "no deployment was ever applied here"}
    except CorruptFile as exc:
        return {"deployment": None, "note": f"the state file is unreadable: {exc}"}
    manifest = (saved.get("doc") or {}).get("manifest") or {}
    for spec in (manifest.get("modules") or {}).values():
        if isinstance(spec, dict) and isinstance(spec.get("env"), dict):
            spec["env"] = {key: "[redacted]" for key in spec["env"]}
    return saved


def write(state: StateDir, output: Path, config_path: Path | None,
          environ: dict[str, str], progress: Callable[[str], None] = lambda _: None,
          run_checks: bool = True) -> dict[str, Any]:
    """Write the bundle to ``output``; returns its path, size and member names."""
    config_text: str | None = None
    if config_path is not None:
        try:
            config_text = config_path.read_text(errors="replace")
        except OSError:
            config_text = None
    red = Redactor(known_secrets(state, config_text, environ))
    folder = output.name.removesuffix(".tar.gz").removesuffix(".tgz") or default_name()
    members: list[tuple[str, bytes]] = []

    def add(name: str, content: str | dict[str, Any] | list[Any]) -> None:
        if not isinstance(content, str):
            content = json.dumps(red.data(content), indent=2, default=str) + "\n"
        # A last pass over the whole member: a known secret anywhere is removed.
        members.append((f"{folder}/{name}", red.text(content).encode()))

    progress("status")
    add("status.json", _status(state))
    progress("config")
    shown, effective = _config(config_path, red)
    add("config.yaml", shown)
    add("config-effective.json", effective)
    try:
        reg = state.registration()
        add("registration.json", reg.to_dict() if reg else {"registered": False})
    except Exception as exc:  # a corrupt registration is exactly what support must see
        add("registration.json", {"error": f"{type(exc).__name__}: {exc}"})
    if run_checks:
        progress("checks (they try the network; a few seconds)")
        add("check.json", _checks(state, config_path))
    else:
        add("check.json", {"note": "the checks were not run (--no-checks)."})
    progress("versions and environment")
    add("versions.json", _versions())
    add("environment.json", {k: environ[k] for k in ENV_NAMES if k in environ}
        | {k: v for k, v in environ.items() if k.startswith("OUTPOST_")})
    add("state-dir.json", _state_listing(state.root))
    retention = effective.get("settings", {}).get("job_log_retention") \
        or agent_config.AgentConfig().job_log_retention
    add("joblogs.json", {"retention_seconds": retention,
                         "jobs": joblogs.index(state.root, float(retention))})
    # Extensions: their states and their own logs. Protected settings are never on disk
    # (and their values are redacted from the handlers' output before it is written).
    from .extensions.outlog import log_dir as extension_logs
    from .extensions.reconcile import read_states

    add("extensions.json", {"extensions": read_states(state.root)})
    add("modules.json", _modules(state))
    progress("logs")
    for path in logs.log_files(state.root):
        try:
            raw = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        add(f"logs/{path.name}", red.log_text(raw))
    for path in sorted(extension_logs(state.root).glob("*.log*")):
        try:
            raw = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        add(f"logs/extensions/{path.name}", red.log_text(raw))
    for path in sorted((state.root / "logs" / "modules").glob("*.log")):
        try:
            tail = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        add(f"logs/modules/{path.name}", red.log_text("\n".join(tail[-MODULE_LOG_LINES:])
                                                      + "\n"))
    add("README.txt", _readme(folder, [name for name, _ in members]))
    progress("writing")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh, tarfile.open(fileobj=fh, mode="w:gz") as tar:
            now = time.time()
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), int(now), 0o600
                tar.addfile(info, io.BytesIO(data))
    except OSError as exc:
        raise OutpostError("bundle_failed", f"Cannot write the support bundle to {output}: "
                           f"{exc.strerror or exc}.", path=str(output)) from exc
    return {"path": str(output.resolve()), "bytes": output.stat().st_size,
            "members": [name for name, _ in members]}


def _readme(folder: str, names: list[str]) -> str:
    listed = "\n".join(f"  {name.removeprefix(folder + '/')}" for name in names)
    return (f"Outpost support bundle, written {logs.iso(time.time())} by outpost "
            f"{__version__}.\n\nMembers:\n{listed}\n  README.txt\n\n"
            "Secrets were removed before anything was written: the machine key is not "
            "included; the values of settings, fields and variables named as secrets (token, "
            "password, account_key, Authorization...), passwords in URLs, credentials after "
            f"Bearer or Basic, private key blocks and Outpost's tokens and keys read {REDACTED}. "
            "Paths are left as they are. Job output is not included, only the "
            "index of the job logs kept on the machine ('outpost agent logs --job ID' "
            "shows one there).\n")
