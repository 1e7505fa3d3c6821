"""Where an extension lives on the machine, who its commands run as, and within what limits.

The tree (``Runtime.root``) holds, per extension ``NAME``::

    NAME/VERSION/   one directory per unpacked version (the package, read-only)
    NAME/config/    <seq>.settings.json: the public settings (OUTPOST_EXT_CONFIG_DIR),
                    written by the agent, readable by the commands' user
    NAME/status/    <seq>.status, written by the commands (OUTPOST_EXT_STATUS_DIR)
    NAME/logs/      the extension's own files of logs (OUTPOST_EXT_LOG_DIR)
    NAME/data/      what the extension keeps between its commands and across its versions
                    until it is uninstalled (OUTPOST_EXT_DATA_DIR): a cache, say

An agent that is not root runs the commands as its own user and keeps the tree in
``<state>/extensions/``. A root agent runs them as the unprivileged system user
``outpost-ext`` (made with useradd at first need, as jobusers.py makes job users) unless the
goal names a user (``run_as``, the operator's choice); that user must reach the tree, and the
state directory is the agent's alone (0700), so the tree is then a directory beside it,
``<state>-extensions/`` (root's, 0711: passable, not listable), or, when the state
directory's parent is itself private, ``/var/lib/outpost-extensions-HASH/``. The status, logs
and data directories belong to the user the commands run as (0700).

Each extension has a control group of its own, ``ext-NAME`` beside the job slots' groups
(cgroups.py, v1 and v2), with the manifest's limits or the agent's defaults
(``extension_memory_mb``, ``extension_cpus``, ``extension_processes``). Its processes stay
in it between commands (an enable may leave a service running); a disable empties it, and
an uninstall removes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from outpost.protocol.errors import OutpostError

from .. import cgroups
from ..jobusers import _useradd
from ..sandbox import _reachable, _safe_root, agent_user

if TYPE_CHECKING:  # read without pydantic, from an extension's or a module's manifest
    from outpost.protocol.readers import Limits as ManifestLimits

log = logging.getLogger("outpost.agent.extensions")

EXT_USER = "outpost-ext"
STATE_DIR = "extensions"  # <state>/extensions/: state.json
LIB = Path("/var/lib")


def shared_root(state_root: Path, tree: str = STATE_DIR) -> Path:
    """The tree for commands that run as another user (see the module docstring); ``tree``
    names it (the module supervisor keeps its packages in a tree of its own, ``modules``)."""
    return beside_state(state_root, tree, lambda candidate: OutpostError(
        "ext_tree_unsafe", f"The directory {candidate} for extensions is not the "
        "agent's own, or others may write it; the agent will not run extensions "
        "from it.", path=str(candidate)))


def beside_state(state_root: Path, suffix: str,
                 unsafe: Callable[[Path], OutpostError]) -> Path:
    """A directory (root's or the agent user's, 0711) that other users may pass through,
    beside the private state directory: ``<state>-SUFFIX/``, or
    ``/var/lib/outpost-SUFFIX-HASH/`` when the state directory's parent is private. The
    extensions' tree and the message hub's socket (agent/modules/msghub.py) live in one.
    ``unsafe(path)`` is the error when it is not the agent's own or others may write it."""
    state_root = state_root.resolve()
    if _reachable(state_root.parent):
        candidate = state_root.parent / f"{state_root.name}-{suffix}"
    else:
        # Not the temporary directory, whose cleaners would take installed packages away.
        tag = hashlib.sha256(str(state_root).encode()).hexdigest()[:10]
        base = LIB if _reachable(LIB) else Path(tempfile.gettempdir())
        candidate = base / f"outpost-{suffix}-{tag}"
    with contextlib.suppress(FileExistsError):
        candidate.mkdir(mode=0o711)
    if not _safe_root(candidate):
        raise unsafe(candidate)
    os.chmod(candidate, 0o711)
    return candidate


def _make_user(name: str) -> None:
    _useradd(name, "Outpost extension handlers")


class Runtime:
    def __init__(self, state_root: Path, defaults: cgroups.Limits,
                 hierarchy: cgroups.Hierarchy | None = None, why_no_cgroups: str = "",
                 root: Path | None = None, make_user: Callable[[str], None] = _make_user,
                 ext_user: str = EXT_USER, tree: str = STATE_DIR,
                 group_prefix: str = "ext-") -> None:
        self.state_root = state_root
        self.tree = tree
        self.group_prefix = group_prefix
        self.state_dir = state_root / tree
        self.privileged = os.geteuid() == 0
        self.defaults = defaults
        self.hierarchy = hierarchy
        self.why_no_cgroups = why_no_cgroups or "no cgroup hierarchy was found"
        self._root = root
        self._make_user = make_user
        self.ext_user = ext_user
        self._groups: dict[str, cgroups.Group] = {}
        self._told_unprivileged = False

    @property
    def root(self) -> Path:
        if self._root is None:
            self._root = (shared_root(self.state_root, self.tree) if self.privileged
                          else self.state_dir)
            self._root.mkdir(parents=True, exist_ok=True)
        return self._root

    # --- places ------------------------------------------------------------------------
    def home(self, name: str) -> Path:
        path = self.root / name
        if not path.is_dir():
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, 0o711)
        return path

    def package_dir(self, name: str, version: str) -> Path:
        return self.root / name / version

    def config_dir(self, name: str) -> Path:
        return self.root / name / "config"

    def status_dir(self, name: str) -> Path:
        return self.root / name / "status"

    def log_dir(self, name: str) -> Path:
        return self.root / name / "logs"

    def data_dir(self, name: str) -> Path:
        return self.root / name / "data"

    def versions(self, name: str) -> list[str]:
        """The version directories on disk."""
        home = self.root / name
        if not home.is_dir():
            return []
        return sorted(p.name for p in home.iterdir()
                      if p.is_dir() and p.name[:1].isdigit())

    def prepare(self, name: str, identity: tuple[int, int] | None) -> None:
        """The extension's writable directories, its user's."""
        self.home(name)
        config = self.config_dir(name)
        config.mkdir(parents=True, exist_ok=True, mode=0o700)
        if identity is not None and self.privileged:
            # The agent writes the settings: the directory stays its own (a link the
            # extension's user planted there cannot redirect a write of root's), readable
            # by that user's group.
            os.chown(config, 0, identity[1])
            os.chmod(config, 0o750)
        for path in (self.status_dir(name), self.log_dir(name), self.data_dir(name)):
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            if identity is not None and self.privileged:
                _chown_tree(path, identity)

    def remove(self, name: str) -> None:
        """Every file of the extension: its versions, settings, status and logs."""
        shutil.rmtree(self.root / name, ignore_errors=True)

    # --- who ---------------------------------------------------------------------------
    def identity(self, run_as: str | None) -> tuple[tuple[int, int] | None, str]:
        """(uid, gid) to run as (None: the agent's own user) and how to say it."""
        if not self.privileged:
            if not self._told_unprivileged:
                self._told_unprivileged = True
                log.info("extensions: the agent does not run as root, so extension handlers "
                         "run as its own user %s", agent_user())
            return None, f"{agent_user()} (the agent's user)"
        name = run_as or self.ext_user
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            if run_as:
                raise OutpostError(
                    "ext_run_as_unknown", f"The user '{run_as}' that the extension's goal "
                    "runs its handlers as does not exist on this machine.", user=run_as
                ) from None
            log.info("making the extension user %s", name)
            try:
                self._make_user(name)
            except OutpostError as exc:
                raise OutpostError("ext_user_unavailable", f"The agent could not make the "
                                   f"extension user '{name}': {exc.message}",
                                   user=name) from exc
            entry = pwd.getpwnam(name)
        if entry.pw_uid == 0 and not run_as:
            raise OutpostError("ext_user_unavailable", f"The extension user '{name}' has uid "
                               "0 on this machine; the agent will not run extensions as root "
                               "under another name.", user=name)
        if entry.pw_uid == 0:
            return None, "root (the goal asks for it)"
        said = f"{name} (the goal asks for it)" if run_as else name
        return (entry.pw_uid, entry.pw_gid), said

    # --- limits ------------------------------------------------------------------------
    def limits(self, asked: ManifestLimits) -> cgroups.Limits:
        d = self.defaults
        return cgroups.Limits(
            memory_mb=asked.memory_mb if asked.memory_mb is not None else d.memory_mb,
            cpus=asked.cpus if asked.cpus is not None else d.cpus,
            processes=asked.processes if asked.processes is not None else d.processes)

    def group(self, name: str) -> cgroups.Group | None:
        """The extension's control group, made if missing (None: no cgroups here)."""
        if self.hierarchy is None:
            return None
        found = self._groups.get(name)
        if found is not None:
            return found
        dirs: dict[str, Path] = {}
        made: dict[Path, Path] = {}
        try:
            for controller, base in self.hierarchy.bases.items():
                if base not in made:
                    path = base / f"{self.group_prefix}{name}"
                    path.mkdir(exist_ok=True)
                    made[base] = path
                dirs[controller] = made[base]
        except OSError as exc:
            log.warning("extension %s has no control group (%s); it runs without limits",
                        name, exc.strerror or exc)
            return None
        group = cgroups.Group(self.hierarchy.version, dirs)
        self._groups[name] = group
        return group

    def empty_group(self, name: str) -> None:
        group = self.group(name) if self.hierarchy is not None else None
        if group is not None:
            with contextlib.suppress(OSError):
                group.empty()

    def remove_group(self, name: str) -> None:
        group = self.group(name) if self.hierarchy is not None else None
        if group is None:
            return
        with contextlib.suppress(OSError):
            group.empty()
        group.remove()
        self._groups.pop(name, None)

    def close(self) -> None:
        """At the agent's stop: a group with processes stays, with them (an extension's
        service outlives an agent restart); an empty one goes (made again when needed)."""
        for group in self._groups.values():
            try:
                empty = not group.members()
            except OSError:
                empty = False
            if empty:
                group.remove()
                continue
            for fd in [*group._fds, *group._enter_fds]:
                with contextlib.suppress(OSError):
                    os.close(fd)
            group._fds, group._enter_fds = [], []
        self._groups.clear()

    def describe(self) -> str:
        if self.hierarchy is not None:
            return f"{self.hierarchy.describe()}, one group per extension"
        return f"no limits (no cgroups: {self.why_no_cgroups})"


def _chown_tree(path: Path, identity: tuple[int, int]) -> None:
    uid, gid = identity
    for root, dirs, files in os.walk(path):
        for entry in [*dirs, *files]:
            with contextlib.suppress(OSError):
                os.lchown(os.path.join(root, entry), uid, gid)
    st = os.lstat(path)
    if (st.st_uid, st.st_gid) != (uid, gid):
        os.chown(path, uid, gid)
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
