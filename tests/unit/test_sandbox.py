"""The job sandbox's parts (agent/cgroups.py, agent/sandbox.py): cgroup v2 and v1 through a
directory tree that stands in for the kernel's (the root directory is the seam; this
machine has v1 only, and tests/integration/test_sandbox.py runs jobs in its real groups),
the rlimits used where no group can be made, and job users' working directories used
again."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from outpost.agent import cgroups, helper, runner
from outpost.agent.cgroups import Limits
from outpost.agent.jobusers import JobUsers
from outpost.agent.sandbox import Sandbox
from tests.support import shared_dir


def _v2_tree(root: Path) -> Path:
    """A unified hierarchy whose agent runs in /system.slice/outpost-agent.service."""
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    own = root / "system.slice" / "outpost-agent.service"
    own.mkdir(parents=True)
    (own / "cgroup.controllers").write_text("cpu memory pids\n")
    (own / "cgroup.procs").write_text("4242\n")
    return own


def test_v2_the_agent_moves_to_a_leaf_and_each_slot_gets_its_limits(tmp_path: Path) -> None:
    own = _v2_tree(tmp_path / "cg")
    found = cgroups.detect("/var/lib/outpost", tmp_path / "cg",
                           "0::/system.slice/outpost-agent.service\n")
    assert found.version == 2 and found.describe().startswith("cgroup v2 (")
    # No internal processes: the agent went into a leaf, and the controllers are handed down.
    assert (own / "agent" / "cgroup.procs").read_text() == "0"
    assert found.home == [own / "agent"]
    assert (own / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    [base] = set(found.bases.values())
    assert base.parent == own and base.name.startswith("outpost-")
    assert (base / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"

    group = found.group(3)
    assert group.path == base / "slot3"
    group.apply(Limits(memory_mb=256, cpus=0.5, processes=100))
    assert (group.path / "memory.max").read_text() == str(256 * 2**20)
    assert (group.path / "memory.swap.max").read_text() == "0"
    assert (group.path / "cpu.max").read_text() == "50000 100000"
    assert (group.path / "pids.max").read_text() == "100"
    group.apply(Limits(memory_mb=0, cpus=0, processes=0))
    assert (group.path / "memory.max").read_text() == "max"
    assert (group.path / "cpu.max").read_text() == "max 100000"
    assert (group.path / "pids.max").read_text() == "max"

    # The kernel's count of OOM kills in memory.events says a job went over its limit.
    (group.path / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 0\n")
    before = group.oom_baseline()
    assert not group.oom_since(before)
    (group.path / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 2\noom_kill 1\n")
    assert group.oom_since(before)
    # Emptying: cgroup.kill where the kernel has it.
    (group.path / "cgroup.kill").write_text("")
    assert group.empty() and (group.path / "cgroup.kill").read_text() == "1"


def test_v2_without_the_controllers_is_unavailable(tmp_path: Path) -> None:
    own = _v2_tree(tmp_path / "cg")
    (own / "cgroup.controllers").write_text("cpu\n")
    with pytest.raises(cgroups.Unavailable, match="memory, pids"):
        cgroups.detect("/var/lib/outpost", tmp_path / "cg",
                       "0::/system.slice/outpost-agent.service\n")


def test_v1_one_group_per_controller(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    for controller in ("memory", "cpu", "pids"):
        (root / controller).mkdir(parents=True)
        (root / controller / "cgroup.procs").write_text("")
    (root / "memory" / "box").mkdir()
    found = cgroups.detect("/srv/agent", root, "4:memory:/box\n2:cpu,cpuacct:/\n8:pids:/\n")
    assert found.version == 1
    assert found.bases["memory"].parent == root / "memory" / "box"
    assert found.bases["cpu"].parent == root / "cpu"
    group = found.group(1)
    group.apply(Limits(memory_mb=64, cpus=2, processes=40))
    assert (group.dirs["memory"] / "memory.limit_in_bytes").read_text() == str(64 * 2**20)
    assert (group.dirs["cpu"] / "cpu.cfs_quota_us").read_text() == "200000"
    assert (group.dirs["pids"] / "pids.max").read_text() == "40"
    (group.dirs["memory"] / "memory.oom_control").write_text(
        "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert group.oom_kills() == 2
    shutil.rmtree(root / "pids")
    with pytest.raises(cgroups.Unavailable, match="no pids hierarchy"):
        cgroups.detect("/srv/agent", root, "")


def test_without_cgroups_a_job_gets_rlimits_and_the_agent_says_so(tmp_path: Path) -> None:
    sandbox = Sandbox(tmp_path / "state", 2, Limits(memory_mb=300, cpus=1, processes=50),
                      job_users=False, cgroup_root=tmp_path / "no-cgroups", proc_cgroup="")
    sandbox.start()
    assert sandbox.hierarchy is None
    assert sandbox.describe_limits().startswith("rlimits (no cgroups: no memory hierarchy")
    assert sandbox.status()["limits_by"] == sandbox.describe_limits()
    lease = sandbox.lease({"job_id": "j", "limits": {"memory_mb": 200, "processes": None}},
                          None)
    assert lease.limits == Limits(memory_mb=200, cpus=1, processes=50)
    argv, identity, preexec = lease.forked(["bash", "-c", "ulimit -d; ulimit -u"])
    assert preexec is not None and identity is None
    done = subprocess.run(argv, preexec_fn=preexec, capture_output=True, text=True,
                          check=True)
    data_kib, nproc = done.stdout.split()
    assert int(data_kib) == 200 * 1024
    # RLIMIT_NPROC counts all of the user's processes: the job's 50 come on top of those
    # the agent's user ran at the start.
    assert int(nproc) > 50
    lease.release()
    assert not any(slot.busy for slot in sandbox.slots)


root_only = pytest.mark.skipif(os.geteuid() != 0, reason="job users need a root agent")


def _job(sandbox: Sandbox, tmp_path: Path, job_id: str, content: str) -> runner.JobRun:
    payload = {"job_id": job_id, "attempt": 1, "type": "bash", "content": content,
               "job_token": f"ojt_{job_id}.secret"}

    async def call(*_: Any) -> dict[str, Any]:
        return {"id": job_id, "status": "Completed"}

    return runner.JobRun(payload, tmp_path / "state" / "jobs", tmp_path / "state" / "spool",
                         call, "https://hub:8443", "CA", sandbox=sandbox)


def _output(run: runner.JobRun) -> list[str]:
    asyncio.run(run.run())
    kept = tmp_path_of(run) / "joblogs" / f"{run.id}.1.jsonl"
    return [line for line in kept.read_text().splitlines() if '"Output"' in line]


def tmp_path_of(run: runner.JobRun) -> Path:
    return run.spool.path.parent.parent


@root_only
def test_a_job_users_directory_serves_the_next_job_of_the_slot(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir(mode=0o700)
    sandbox = Sandbox(tmp_path / "state", 1, Limits(), users=JobUsers())
    sandbox.start()
    try:
        assert sandbox.jobs_root is not None
        first = _job(sandbox, tmp_path, "job-a", 'id -un; stat -c "%U %a" . "$OUTPOST_HELPER_DIR/'
                     'job.token" "$OUTPOST_HELPER_DIR/outpost.sh"\n')
        out = _output(first)
        assert '"outpost-job1"' in out[0], out
        # Its directory and token are its user's; the shared helper files stay root's,
        # readable by all.
        assert '"outpost-job1 700"' in out[1] and '"outpost-job1 600"' in out[2], out
        assert '"root 644"' in out[3], out
        [spare] = (sandbox.jobs_root / ".spare").iterdir()
        inode = os.stat(spare).st_ino
        assert (spare / helper.DIR_NAME / helper.TOKEN_FILE).read_bytes().strip(b"\0") == b""

        # The next job of the slot gets it; it leaves its runbook file a second name
        # elsewhere (where the next job's runbook and token would be written): the
        # directory is not kept.
        with shared_dir() as shared:
            second = _job(sandbox, tmp_path, "job-b", 'cat "$OUTPOST_HELPER_DIR/job.token"\n'
                          f'stat -c %i .\nln runbook.sh {shared}/kept\n')
            out = _output(second)
            assert '"ojt_job-b.secret"' in out[0] and f'"{inode}"' in out[1], out
            assert (shared / "kept").exists()
        assert not list((sandbox.jobs_root / ".spare").iterdir())
        assert not (sandbox.jobs_root / "job-b").exists()
    finally:
        sandbox.close()
        if sandbox.jobs_root is not None:
            shutil.rmtree(sandbox.jobs_root, ignore_errors=True)
