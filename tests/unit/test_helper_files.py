"""The runbook helper's files in a job's directory: hard links to the agent's one shared copy
of what every job gets alike, copies of their own where a link cannot (or must not) be made,
and the documented layout of $OUTPOST_HELPER_DIR either way (docs/assets.md)."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import pwd
from pathlib import Path
from typing import Any

import pytest

from outpost.agent import helper, runner

SHARED = (helper.MODULE_FILE, helper.SHELL_FILE, helper.CA_FILE)
OWN = (helper.CONFIG_FILE, helper.TOKEN_FILE)
LAYOUT = {*SHARED, *OWN}


def _job(tmp_path: Path, job_id: str, ca: str, shared: helper.SharedFiles | None) -> Path:
    workdir = tmp_path / "jobs" / job_id
    workdir.mkdir(parents=True, mode=0o700)
    env = helper.prepare(workdir, {"job_id": job_id, "job_token": f"ojt_{job_id}.s"},
                         "https://hub:8443", ca, shared)
    folder = Path(env["OUTPOST_HELPER_DIR"])
    assert folder == workdir / helper.DIR_NAME and env["PYTHONPATH"] == str(folder)
    assert {p.name for p in folder.iterdir()} == LAYOUT
    assert os.stat(folder).st_mode & 0o777 == 0o700
    for item in folder.iterdir():
        assert os.stat(item).st_mode & 0o777 == 0o600, item
    return folder


def _ino(path: Path) -> int:
    return os.stat(path).st_ino


def test_a_job_links_the_shared_copies_and_writes_its_own_identity(tmp_path: Path) -> None:
    shared = helper.SharedFiles(tmp_path / "helper")
    one = _job(tmp_path, "j1", "CA PEM", shared)
    two = _job(tmp_path, "j2", "CA PEM", shared)
    assert os.stat(tmp_path / "helper").st_mode & 0o777 == 0o700
    module, shell = helper._sources()
    for name, text in zip(SHARED, (module, shell, "CA PEM"), strict=True):
        source = tmp_path / "helper" / name
        assert os.stat(source).st_mode & 0o777 == 0o600
        assert _ino(one / name) == _ino(two / name) == _ino(source), name
        assert os.stat(source).st_nlink == 3
        assert (two / name).read_text() == text
    for name in OWN:
        assert os.stat(one / name).st_nlink == 1 and _ino(one / name) != _ino(two / name)
    assert json.loads((two / helper.CONFIG_FILE).read_text())["job_id"] == "j2"
    assert (two / helper.TOKEN_FILE).read_text() == "ojt_j2.s\n"
    # A finished job's directory goes; the shared copy and the other job's link stay.
    import shutil

    shutil.rmtree(one.parent)
    assert (two / helper.MODULE_FILE).read_text() == module
    assert os.stat(tmp_path / "helper" / helper.MODULE_FILE).st_nlink == 2


def test_a_new_ca_is_a_new_shared_file_and_older_jobs_keep_theirs(tmp_path: Path) -> None:
    shared = helper.SharedFiles(tmp_path / "helper")
    old = _job(tmp_path, "j1", "OLD CA", shared)
    new = _job(tmp_path, "j2", "NEW CA", shared)
    assert (old / helper.CA_FILE).read_text() == "OLD CA"
    assert (new / helper.CA_FILE).read_text() == "NEW CA"
    assert (tmp_path / "helper" / helper.CA_FILE).read_text() == "NEW CA"
    assert _ino(new / helper.CA_FILE) == _ino(tmp_path / "helper" / helper.CA_FILE)
    assert _ino(old / helper.CA_FILE) != _ino(new / helper.CA_FILE)
    assert _ino(old / helper.MODULE_FILE) == _ino(new / helper.MODULE_FILE)  # unchanged
    assert not [p for p in (tmp_path / "helper").iterdir() if p.name.startswith(".")]


def test_a_job_that_writes_into_its_link_does_not_reach_the_next_job(tmp_path: Path) -> None:
    shared = helper.SharedFiles(tmp_path / "helper")
    first = _job(tmp_path, "j1", "CA", shared)
    with open(first / helper.SHELL_FILE, "a") as fh:  # in place: the shared inode changes
        fh.write("echo tampered\n")
    os.chmod(first / helper.CA_FILE, 0o644)
    second = _job(tmp_path, "j2", "CA", shared)  # _job checks the modes are 0600
    assert (second / helper.SHELL_FILE).read_text() == helper._sources()[1]
    assert _ino(second / helper.SHELL_FILE) != _ino(first / helper.SHELL_FILE)
    assert _ino(second / helper.MODULE_FILE) == _ino(first / helper.MODULE_FILE)


def test_the_next_agent_keeps_the_copies_it_finds_unless_they_changed(tmp_path: Path) -> None:
    root = tmp_path / "helper"
    _job(tmp_path, "j1", "CA", helper.SharedFiles(root))
    before = {name: _ino(root / name) for name in SHARED}
    (root / helper.CA_FILE).write_text("not the CA")
    (root / ".outpost.sh.abc123.tmp").write_text("a write cut short")
    later = _job(tmp_path, "j2", "CA", helper.SharedFiles(root))  # a restarted agent
    assert _ino(later / helper.MODULE_FILE) == before[helper.MODULE_FILE]
    assert _ino(later / helper.SHELL_FILE) == before[helper.SHELL_FILE]
    assert (later / helper.CA_FILE).read_text() == "CA"
    assert _ino(later / helper.CA_FILE) != before[helper.CA_FILE]
    assert not (root / ".outpost.sh.abc123.tmp").exists()


def test_without_a_link_each_job_gets_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    def no_link(*_: Any, **__: Any) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(helper.os, "link", no_link)
    shared = helper.SharedFiles(tmp_path / "helper")
    with caplog.at_level(logging.WARNING, "outpost.agent.helper"):
        one = _job(tmp_path, "j1", "CA", shared)
        two = _job(tmp_path, "j2", "CA", shared)
    for name in SHARED:
        assert os.stat(one / name).st_nlink == 1 and _ino(one / name) != _ino(two / name)
    assert (two / helper.CA_FILE).read_text() == "CA"
    assert len([r for r in caplog.records if "cannot be shared" in r.getMessage()]) == 1


def test_a_shared_copy_on_another_file_system_gives_copies(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no /dev/shm on another file system than the temporary directory")
    import tempfile

    with tempfile.TemporaryDirectory(dir=shm) as other:
        shared = helper.SharedFiles(Path(other) / "helper")
        folder = _job(tmp_path, "j1", "CA", shared)
        for name in SHARED:
            assert os.stat(folder / name).st_nlink == 1
            assert os.stat(folder / name).st_dev != os.stat(Path(other) / "helper" / name).st_dev
        assert (folder / helper.MODULE_FILE).read_text() == helper._sources()[0]


def test_at_the_link_limit_the_next_job_gets_a_new_shared_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = helper.SharedFiles(tmp_path / "helper")
    first = _job(tmp_path, "j1", "CA", shared)
    real_link = os.link
    failures = [errno.EMLINK]

    def limited(src: Any, dst: Any, **kw: Any) -> None:
        if Path(dst).name == helper.CA_FILE and failures:
            raise OSError(failures.pop(), "Too many links")
        real_link(src, dst, **kw)

    monkeypatch.setattr(helper.os, "link", limited)
    second = _job(tmp_path, "j2", "CA", shared)
    third = _job(tmp_path, "j3", "CA", shared)
    assert os.stat(second / helper.CA_FILE).st_nlink == 1  # a copy
    assert _ino(third / helper.CA_FILE) == _ino(tmp_path / "helper" / helper.CA_FILE)
    assert _ino(third / helper.CA_FILE) != _ino(first / helper.CA_FILE)


def test_without_shared_files_every_file_is_a_copy(tmp_path: Path) -> None:
    one = _job(tmp_path, "j1", "CA", None)
    for name in LAYOUT:
        assert os.stat(one / name).st_nlink == 1


# --- through JobRun ------------------------------------------------------------------------

def _run(tmp_path: Path, job_id: str = "job1", **job: Any) -> runner.JobRun:
    payload = {"job_id": job_id, "attempt": 1, "type": "bash", "content": "echo hi\n",
               "job_token": f"ojt_{job_id}.s", **job}

    async def call(*_: Any) -> dict[str, Any]:
        return {}

    return runner.JobRun(payload, tmp_path / "jobs", tmp_path / "spool", call,
                         "https://hub:8443", "CA")


def _done(run: runner.JobRun) -> None:
    run._cleanup()
    run.spool.close()


def test_a_job_of_the_agent_links_from_the_state_dir(tmp_path: Path) -> None:
    run = _run(tmp_path)
    _, workdir, env, identity = run._spawn_args()
    assert identity is None and workdir == tmp_path / "jobs" / "job1"
    folder = Path(env["OUTPOST_HELPER_DIR"])
    for name in SHARED:
        assert _ino(folder / name) == _ino(tmp_path / helper.SHARED_DIR / name)
    _done(run)
    assert (tmp_path / helper.SHARED_DIR / helper.MODULE_FILE).exists()


def test_a_run_as_job_gets_copies_and_no_shared_file_changes_owner(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    passed: list[Any] = []
    real = helper.prepare

    def spy(*args: Any, **kwargs: Any) -> dict[str, str]:
        passed.append(args[4] if len(args) > 4 else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(helper, "prepare", spy)
    if os.geteuid() == 0:
        user = pwd.getpwnam("nobody")
        identity = (user.pw_uid, user.pw_gid)
        run = _run(tmp_path, run_as="nobody")
    else:  # the seam only: "another user" who is this one, so chown is allowed
        identity = (os.getuid(), os.getgid())
        monkeypatch.setattr(runner, "run_as_identity", lambda _user: identity)
        run = _run(tmp_path, run_as="someone")
    own = _run(tmp_path, "job0")
    own._spawn_args()  # a job of the agent's own user first: the shared files exist
    _, workdir, env, got = run._spawn_args()
    try:
        assert isinstance(passed[0], helper.SharedFiles) and passed[1:] == [None]
        assert got == identity and workdir != tmp_path / "jobs" / "job1"
        folder = Path(env["OUTPOST_HELPER_DIR"])
        assert {p.name for p in folder.iterdir()} == LAYOUT
        for name in LAYOUT:
            st = os.stat(folder / name)
            assert st.st_nlink == 1 and (st.st_uid, st.st_gid) == identity, name
        sources = list((tmp_path / helper.SHARED_DIR).iterdir())
        assert len(sources) == len(SHARED)
        for source in sources:
            assert os.stat(source).st_uid == os.geteuid() and os.stat(source).st_nlink == 2
    finally:
        _done(run)
        _done(own)


def test_the_helper_works_from_its_links(tmp_path: Path) -> None:
    """A bash runbook sources the linked shell helper and a record reaches the spool."""
    run = _run(tmp_path, content='. "$OUTPOST_HELPER_DIR/outpost.sh"\n'
                                 'outpost_warning "from the helper"\n')
    outcome = asyncio.run(run._execute())
    run._commit()
    assert outcome["exit_code"] == 0, outcome
    lines, _, _ = run.spool.read(0)
    assert [json.loads(line)["stream"] for line in lines] == ["Warning"]
    _done(run)
