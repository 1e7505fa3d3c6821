"""A client that hangs up never ends the hub, and printing commands still end quietly.

The CLI resets SIGPIPE to its default action so that ``outpost job list | head`` ends
quietly; the daemons it starts must ignore it again, or the first TLS client that closes
before reading its answer ends the hub with SIGPIPE (exit 141, nothing in its log).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

from tests.support import OUTPOST, Hub, clean_env, wait_until

BIG = ("/openapi.json", "/healthz", "/docs", "/v1/ca")


def _hang_up(hub: Hub, path: str, reset: bool) -> None:
    """Send a request for ``path`` over TLS and close without reading the answer: an
    ordinary close, or a TCP reset (SO_LINGER 0) when ``reset``."""
    ctx = hub.ssl_context()
    raw = socket.create_connection(("127.0.0.1", hub.port), timeout=5)
    tls = ctx.wrap_socket(raw, server_hostname="localhost")
    # Many requests on one connection: answers pile up for a reader that is gone.
    request = (f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n" * 20).encode()
    tls.sendall(request)
    if reset:
        tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw_fd = tls.detach()  # no TLS close_notify: the peer just vanishes
        os.close(raw_fd)
    else:
        tls.close()


def test_clients_that_hang_up_do_not_end_the_hub(sqlite_hub: Hub) -> None:
    hub = sqlite_hub
    for round_ in range(6):
        for index in range(40):
            _hang_up(hub, BIG[index % len(BIG)], reset=(index + round_) % 2 == 1)
        time.sleep(0.2)
        assert hub.proc is not None and hub.proc.poll() is None, (
            f"the hub exited with {hub.proc.returncode if hub.proc else None} after clients "
            f"hung up:\n{hub.log()}")
    with hub.client() as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/openapi.json").status_code == 200
    assert "Traceback" not in hub.log(), hub.log()


def test_printing_commands_still_end_quietly_when_the_reader_goes(sqlite_hub: Hub,
                                                                   tmp_path: Path) -> None:
    """``outpost job list | head -1``: the command ends without a word on stderr."""
    hub = sqlite_hub
    done = hub.api("POST", "/v1/runbooks", json={"name": "r", "type": "bash",
                                                  "content": "true"})
    assert done.status_code == 201, done.text
    batch = hub.api("POST", "/v1/jobs/batch", json={"jobs": [
        {"runbook": "r", "group": "nobody"} for _ in range(1000)]})
    assert batch.status_code == 201, batch.text
    command = " ".join([*OUTPOST, "job", "list", "--limit", "1000", "--hub", hub.url,
                        "--token", hub.admin_token, "--ca-fingerprint", hub.fingerprint])
    piped = subprocess.run(["bash", "-c", f"{command} | head -1; echo \"$PIPESTATUS\" >&2"],
                           capture_output=True, text=True, timeout=60, env=clean_env())
    status = piped.stderr.strip().splitlines()
    assert status and status[-1] in ("0", "141"), piped.stderr
    assert len(status) == 1, piped.stderr  # nothing but the exit status: no traceback
    assert len(piped.stdout.splitlines()) == 1, piped.stdout


def _agent_log(state: Path, lines: int) -> None:
    state.mkdir(parents=True, exist_ok=True)
    with (state / "agent.log").open("w") as fh:
        for n in range(lines):
            fh.write(json.dumps({"time": time.time(), "level": "info", "logger": "outpost",
                                 "message": f"line {n} " + "x" * 100}) + "\n")


def test_a_follower_ends_quietly_when_its_reader_goes(tmp_path: Path) -> None:
    """``outpost agent logs -f | head -1`` ends (SIGPIPE is ignored: the broken pipe is
    an error it handles), with no traceback."""
    state = tmp_path / "agent"
    _agent_log(state, 2000)
    command = " ".join([*OUTPOST, "agent", "logs", "-f", "--state-dir", str(state)])
    piped = subprocess.run(["bash", "-c", f"{command} | head -1; echo \"$PIPESTATUS\" >&2"],
                           capture_output=True, text=True, timeout=60, env=clean_env())
    status = piped.stderr.strip().splitlines()
    assert status and status[-1] == "141", piped.stderr
    assert len(status) == 1, piped.stderr
    assert len(piped.stdout.splitlines()) == 1, piped.stdout


def test_a_follower_started_with_sigint_ignored_still_stops_on_sigint(tmp_path: Path) -> None:
    """A script that starts ``agent logs -f`` in the background hands it SIGINT ignored;
    the command sets its own handler, so SIGINT (and SIGTERM) stop it."""
    state = tmp_path / "agent"
    _agent_log(state, 3)
    for sig in (signal.SIGINT, signal.SIGTERM):
        with subprocess.Popen(
                [*OUTPOST, "agent", "logs", "-f", "--state-dir", str(state)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(),
                preexec_fn=lambda: (signal.signal(signal.SIGINT, signal.SIG_IGN),
                                    signal.signal(signal.SIGTERM, signal.SIG_IGN))) as proc:
            assert proc.stdout is not None
            assert proc.stdout.readline()  # it runs and follows
            time.sleep(0.5)
            proc.send_signal(sig)
            try:
                _, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise AssertionError(f"signal {sig} did not stop 'agent logs -f'") from None
        assert proc.returncode in (0, 130), (sig, proc.returncode, err)
        assert b"Traceback" not in err, err


def test_the_hub_started_with_sigint_ignored_stops_on_sigint(tmp_path: Path) -> None:
    from tests.support import init_hub

    hub = init_hub(tmp_path / "hub", f"sqlite:///{tmp_path / 'hub.db'}")
    args = [*OUTPOST, "hub", "run", "--data-dir", str(hub.data_dir), "--bind",
            f"127.0.0.1:{hub.port}", "--database-url", hub.database_url]
    with hub.log_path.open("ab") as fh:
        hub.proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT,
                                    env=clean_env(), preexec_fn=lambda: signal.signal(
                                        signal.SIGINT, signal.SIG_IGN))
    try:
        wait_until(hub._ready, 30, what="the hub")
        hub.proc.send_signal(signal.SIGINT)
        assert hub.proc.wait(15) is not None
    finally:
        hub.stop(signal.SIGKILL)
    assert "Traceback" not in hub.log(), hub.log()
