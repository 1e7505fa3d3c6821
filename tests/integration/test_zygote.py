"""The test suite's fork server (tests/zygote.py): its children are the processes a plain
``subprocess.Popen`` would start, each with randomness of its own; a Popen's contract holds;
what it may not reproduce starts plainly; it ends with its test process."""

from __future__ import annotations

import json
import os
import pty
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests import zygote
from tests.support import OUTPOST, Agent, Hub, clean_env, healthy_agent, run_cli, wait_until

pytestmark = pytest.mark.skipif(not zygote.enabled(), reason="OUTPOST_TEST_ZYGOTE=0")
ROOT = Path(__file__).resolve().parents[2]  # where tests.zygote imports from
PROBE = [sys.executable, "-m", "tests.zygote", "probe"]


def _probe_from_zygote(env: dict[str, str], cwd: Path, **kw: bool) -> dict[str, Any]:
    server = zygote.server("outpost", clean_env())
    assert server is not None
    out_r, out_w = os.pipe()
    with os.fdopen(out_r) as reader:
        try:
            proc = server.spawn("tests.zygote", ["probe"], env, str(cwd), (0, out_w, 2),
                                kw.get("new_session", False))
        finally:
            os.close(out_w)
        text = reader.read()
    assert proc.wait(30) == 0, text
    probed: dict[str, Any] = json.loads(text)
    assert probed["ppid"] == server.proc.pid  # the zygote's child
    return probed


def _probe_plain(env: dict[str, str], cwd: Path, **kw: Any) -> dict[str, Any]:
    done = subprocess.run(PROBE, env=env, cwd=cwd, stdout=subprocess.PIPE, check=True,
                          timeout=30, **kw)
    probed: dict[str, Any] = json.loads(done.stdout)
    return probed


SAME = ("path0", "cwd", "env", "signals", "sigint", "fds", "threads", "handlers", "tempdir",
        "stdout_buffered", "isatty", "rlimits", "umask", "cmdline", "environ")
RANDOM = ("random", "uuid", "urandom", "secret", "nacl")


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_a_child_starts_as_a_plain_process_would(tmp_path: Path, sigint: str) -> None:
    """Environment (replaced, not merged), working directory and its place on sys.path,
    signal dispositions, mask and handlers (SIGINT ignored by the test process stays
    ignored), open descriptors (none of the zygote's), threads, logging handlers, the
    temporary directory, the test process's resource limits and umask (changed after the
    zygote started), its command line and environment as psutil reads them from /proc: as
    in a plain ``python -m``."""
    env = clean_env(OUTPOST_LOG="debug", TMPDIR=str(tmp_path))
    cwd = ROOT
    zygote.server("outpost", clean_env())  # started before the changes below
    previous = signal.signal(signal.SIGINT,
                             signal.SIG_IGN if sigint == "ignored" else signal.default_int_handler)
    umask = os.umask(0o027)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 512), hard))
    try:
        forked, plain = _probe_from_zygote(env, cwd), _probe_plain(env, cwd)
    finally:
        signal.signal(signal.SIGINT, previous)
        os.umask(umask)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert forked["umask"] == 0o027 and forked["rlimits"]["RLIMIT_NOFILE"][0] <= 512
    for key in SAME:
        assert forked[key] == plain[key], key
    assert forked["argv"] == plain["argv"]
    assert forked["sid"] == plain["sid"] and forked["pgid"] == plain["pgid"]
    assert ("SIG_IGN" in forked["sigint"]) == (sigint == "ignored")
    assert forked["tempdir"] == str(tmp_path)
    assert forked["env"] == env


def test_a_new_session_when_asked() -> None:
    forked = _probe_from_zygote(clean_env(), ROOT, new_session=True)
    plain = _probe_plain(clean_env(), ROOT, start_new_session=True)
    assert forked["sid"] == forked["pid"] and plain["sid"] == plain["pid"]
    assert forked["pgid"] == forked["pid"]


def test_children_of_one_zygote_draw_their_own_randomness() -> None:
    """random reseeds after fork; uuid4, secrets, os.urandom and PyNaCl draw from the kernel:
    no two children (nor the zygote's own draw, were it made) share a value."""
    first, second = (_probe_from_zygote(clean_env(), ROOT) for _ in range(2))
    for key in RANDOM:
        assert first[key] != second[key], key


def test_two_hubs_initialised_from_one_zygote_hold_different_keys(tmp_path: Path) -> None:
    made = []
    for name in ("a", "b"):
        done = run_cli("hub", "init", "--data-dir", str(tmp_path / name), "--json")
        assert done.returncode == 0, done.stderr
        made.append(json.loads(done.stdout))
    for key in ("account_id", "primary_key", "admin_token", "ca_fingerprint"):
        assert made[0][key] != made[1][key], key


def test_popen_contract(sqlite_hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    """A hub and an agent from their zygotes: real pids, their own command lines, nothing
    said of how they started (no runpy warning); poll/wait with a timeout, -9 after SIGKILL,
    and reaped by the zygote (no zombie left)."""
    agent = healthy_agent(sqlite_hub, tmp_path, agents, "z1")
    assert isinstance(agent.proc, zygote.Process)
    assert psutil.Process(agent.proc.pid).cmdline()[1:3] == ["-m", "outpost.cli.agentd"]
    assert "Warning" not in agent.log() and "Warning" not in sqlite_hub.log()
    assert agent.stop() == 0
    proc = sqlite_hub.proc
    assert isinstance(proc, zygote.Process)
    assert proc.poll() is None and proc.returncode is None
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(0.2)
    proc.kill()
    assert proc.wait(10) == -signal.SIGKILL and proc.poll() == -signal.SIGKILL
    assert not Path(f"/proc/{proc.pid}").exists()
    proc.send_signal(signal.SIGTERM)  # a process that ended: nothing sent, nothing raised


def test_exit_codes_and_output() -> None:
    done = run_cli("no-such-command")
    assert done.returncode == 2 and "No such command" in done.stderr and done.stdout == ""
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("outpost ")


def test_input_reaches_the_command(sqlite_hub: Hub) -> None:
    done = run_cli("asset", "variable", "set", "colour", "--hub", sqlite_hub.url, "--token",
                   sqlite_hub.admin_token, "--ca-fingerprint", sqlite_hub.fingerprint,
                   input="blue\n")
    assert done.returncode == 0, done.stderr
    got = sqlite_hub.api("GET", "/v1/assets/variables/colour")
    assert got.status_code == 200 and got.json()["value"] == "blue", got.text


def test_a_timeout_kills_the_command() -> None:
    """A command waiting on a hub that never answers: TimeoutExpired after the timeout, the
    child killed."""
    server = zygote.server("outpost", clean_env())
    assert server is not None

    def children() -> set[int]:
        return {int(pid) for pid in os.listdir("/proc") if pid.isdigit()
                and _ppid(int(pid)) == server.proc.pid}

    before = children()
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"https://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(subprocess.TimeoutExpired):
            run_cli("machine", "list", "--hub", url, "--token", "x", "--ca-fingerprint",
                    "AA:" * 31 + "AA", timeout=1.5)
        assert time.monotonic() - started < 10
    assert children() <= before  # the command it forked is gone, reaped


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def test_what_it_may_not_reproduce_starts_plainly(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    args = [*OUTPOST, "--version"]
    assert isinstance(zygote.spawn(args, env=clean_env(), stdout=subprocess.DEVNULL),
                      zygote.Process)
    for env in (clean_env(PYTHONPATH=str(tmp_path)), clean_env(PYTHONNOUSERSITE="1"),
                clean_env(PYTHONUNBUFFERED="0"), clean_env(COVERAGE_PROCESS_START="x")):
        proc = zygote.spawn(args, env=env, stdout=subprocess.DEVNULL)
        assert isinstance(proc, subprocess.Popen) and proc.wait(30) == 0
    proc = zygote.spawn(["/usr/bin/env", *args], env=clean_env(), stdout=subprocess.DEVNULL)
    assert isinstance(proc, subprocess.Popen) and proc.wait(30) == 0
    main, other = pty.openpty()
    try:
        proc = zygote.spawn(args, env=clean_env(), stdout=other)
        assert isinstance(proc, subprocess.Popen) and proc.wait(30) == 0
    finally:
        os.close(main)
        os.close(other)
    monkeypatch.setenv(zygote.SWITCH, "0")
    proc = zygote.spawn(args, env=clean_env(), stdout=subprocess.DEVNULL)
    assert isinstance(proc, subprocess.Popen) and proc.wait(30) == 0


def test_a_variable_read_at_import_picks_a_zygote_of_its_own() -> None:
    """COLUMNS is read as the CLI's console is made (at import): a command with another
    width forks from a zygote that imported with that width, and prints at that width."""
    wide, narrow = (zygote.server("outpost", clean_env(COLUMNS=str(n))) for n in (200, 50))
    assert wide is not None and narrow is not None and wide is not narrow
    assert zygote.server("outpost", clean_env(COLUMNS="200")) is wide
    shown = {n: run_cli("hub", "run", "--help", env=clean_env(COLUMNS=str(n))).stdout
             for n in (200, 50)}
    assert max(map(len, shown[200].splitlines())) > 60 >= max(map(len, shown[50].splitlines()))


def test_the_zygote_ends_with_its_test_process(tmp_path: Path) -> None:
    """A test process killed with SIGKILL leaves no zygote behind."""
    script = ("from tests import support, zygote; zygote.activate();"
              "support.run_cli('--version');"
              "print(zygote.server('outpost', support.clean_env()).proc.pid, flush=True);"
              "import time; time.sleep(60)")
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                          cwd=ROOT, env=clean_env(), text=True) as owner:
        try:
            assert owner.stdout is not None
            pid = int(owner.stdout.readline())
            assert Path(f"/proc/{pid}").exists()
        finally:
            owner.kill()
    wait_until(lambda: not Path(f"/proc/{pid}").exists() or
               Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z",
               10, what="the zygote to end")
