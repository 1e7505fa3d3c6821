"""Where extensions live and within what limits (agent/extensions/runtime.py): the control
group of an extension on cgroup v2, through a directory tree that stands in for the kernel's
(this machine has v1, which test_ext_agent_reconcile.py uses for real), the tree beside the
state directory, and an agent that is not root."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from outpost.agent import cgroups
from outpost.agent.extensions import runtime
from outpost.agent.extensions.runtime import Runtime
from outpost.protocol.errors import OutpostError
from outpost.protocol.extreaders import Limits as ManifestLimits
from tests.support import shared_dir


def _v2(root: Path) -> cgroups.Hierarchy:
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    own = root / "outpost.service"
    own.mkdir()
    (own / "cgroup.controllers").write_text("cpu memory pids\n")
    return cgroups.detect("/var/lib/outpost", root, "0::/outpost.service\n")


def test_each_extension_gets_a_v2_group_with_the_manifests_limits_or_the_defaults(
        tmp_path: Path) -> None:
    hierarchy = _v2(tmp_path / "cg")
    rt = Runtime(tmp_path / "state", cgroups.Limits(memory_mb=256, cpus=1.0, processes=128),
                 hierarchy, root=tmp_path / "tree")
    group = rt.group("backup")
    assert group is not None
    [base] = set(hierarchy.bases.values())
    assert group.path == base / "ext-backup"
    group.apply(rt.limits(ManifestLimits(memory_mb=64, processes=10)))
    assert (group.path / "memory.max").read_text() == str(64 * 2**20)
    assert (group.path / "pids.max").read_text() == "10"
    assert (group.path / "cpu.max").read_text() == "100000 100000"  # the default: 1 CPU
    assert rt.group("backup") is group  # made once
    assert rt.describe().startswith("cgroup v2 (") and "one group per extension" in \
        rt.describe()


def test_without_cgroups_an_extension_has_no_group_and_the_status_says_why(
        tmp_path: Path) -> None:
    rt = Runtime(tmp_path / "state", cgroups.Limits(), None, "no cgroup v1 or v2 mounted",
                 root=tmp_path / "tree")
    assert rt.group("backup") is None
    assert rt.describe() == "no limits (no cgroups: no cgroup v1 or v2 mounted)"


def test_an_agent_that_is_not_root_runs_handlers_as_itself_and_says_so_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rt = Runtime(tmp_path / "state", cgroups.Limits(), root=tmp_path / "tree")
    rt.privileged = False
    with caplog.at_level(logging.INFO, logger="outpost.agent.extensions"):
        assert rt.identity(None)[0] is None
        assert rt.identity("someone")[0] is None
    said = [r.getMessage() for r in caplog.records if "run as its own user" in r.getMessage()]
    assert len(said) == 1, said


def test_the_tree_of_a_root_agent_lies_beside_its_state_directory() -> None:
    with shared_dir() as shared:  # under /var/tmp: every user may pass to it
        os.chmod(shared, 0o755)
        state = shared / "outpost"
        state.mkdir(mode=0o700)
        tree = runtime.shared_root(state)
        assert tree == shared / "outpost-extensions"
        assert (tree.stat().st_mode & 0o777) == 0o711


def test_a_tree_that_others_may_write_is_refused() -> None:
    with shared_dir() as shared:
        os.chmod(shared, 0o755)
        state = shared / "outpost"
        state.mkdir(mode=0o700)
        (shared / "outpost-extensions").mkdir()
        os.chmod(shared / "outpost-extensions", 0o777)
        with pytest.raises(OutpostError) as caught:
            runtime.shared_root(state)
        assert caught.value.code == "E9039"
        assert str(shared / "outpost-extensions") in caught.value.message


def test_a_state_directory_inside_a_private_one_keeps_its_tree_under_var_lib(
        tmp_path: Path) -> None:
    state = tmp_path / "private" / "outpost"
    state.mkdir(parents=True)
    os.chmod(tmp_path / "private", 0o700)
    tree = runtime.shared_root(state)
    try:
        assert tree.parent == runtime.LIB and tree.name.startswith("outpost-extensions-")
    finally:
        tree.rmdir()
