"""``outpost agent support-bundle`` (EX-9): one archive with logs, status, config, check
results and versions, and none of the secrets planted on the machine. A real hub and a real
agent (running through a proxy that is down, as a machine that needs support would be)."""

from __future__ import annotations

import gzip
import json
import os
import tarfile
import time
from pathlib import Path


from outpost.protocol.signing import unb64
from tests.support import (
    Agent,
    Hub,
    clean_env,
    free_port,
    registered_agent,
    run_cli,
    wait_until,
)

PROXY_PASSWORD = "Pr0xyPassw0rd-x7"
COMMENT_TOKEN = "CommentT0ken-5ecret"
ENV_SECRETS = {
    "OUTPOST_ACCOUNT_KEY": "EnvAcctKey-9f8e7d6c5b",
    "OUTPOST_TOKEN": "EnvT0ken-abcdef123",
    "HTTPS_PROXY": "http://bob:EnvPr0xyPass-42@127.0.0.1:9",
    "MY_SERVICE_SECRET": "EnvServiceS3cret-0001",
}
LOG_SECRETS = ["LogBearerT0ken-xyz987", "LogAcctKey-12345678", "LogPr0xyPass-carol",
               "LogFieldPassw0rd-1", "LegacyT0ken-zzz999"]


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path, "r:gz") as tar:
        return {m.name.split("/", 1)[1]: tar.extractfile(m).read()  # type: ignore[union-attr]
                for m in tar.getmembers() if m.isfile()}


def _plant_log_lines(agent: Agent) -> None:
    record = {"time": "2026-01-01T00:00:00.000Z", "level": "ERROR", "logger": "outpost.agent",
              "message": f"upload failed: Authorization: Bearer {LOG_SECRETS[0]}; "
                         f"account_key={LOG_SECRETS[1]} via "
                         f"http://carol:{LOG_SECRETS[2]}@proxy.example:3128",
              "password": LOG_SECRETS[3]}
    lines = json.dumps(record) + "\n" + f"an older text line token={LOG_SECRETS[4]}\n"
    fd = os.open(agent.state_dir / "agent.log", os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, lines.encode())
    finally:
        os.close(fd)


def test_the_bundle_holds_what_support_needs_and_no_secret(
        sqlite_hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    closed = free_port()  # the proxy is down: the machine really needs support
    agent = registered_agent(sqlite_hub, tmp_path, "bundle1", backoff_max=2,
                             proxy=f"http://alice:{PROXY_PASSWORD}@127.0.0.1:{closed}")
    config = agent.write_config()
    config.write_text(config.read_text() + f"# token={COMMENT_TOKEN}\n")
    agents.append(agent.start())
    wait_until(lambda: "hub unreachable" in agent.log(), 20, 0.1, f"a failure\n{agent.log()}")
    _plant_log_lines(agent)
    key_lines = (agent.state_dir / "machine.key").read_text().splitlines()
    seed_b64 = key_lines[1].strip()

    out = tmp_path / "support.tar.gz"
    started = time.monotonic()
    done = run_cli("agent", "support-bundle", "-o", str(out), "--state-dir",
                   str(agent.state_dir), env=clean_env(**ENV_SECRETS))
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert f"Wrote {out.resolve()} (" in done.stdout and "KiB" in done.stdout
    assert "collecting: checks" in done.stderr and "collecting: logs" in done.stderr
    assert out.stat().st_mode & 0o777 == 0o600

    members = _members(out)
    expected = {"README.txt", "status.json", "config.yaml", "config-effective.json",
                "registration.json", "check.json", "versions.json", "environment.json",
                "state-dir.json", "joblogs.json", "logs/agent.log"}
    assert expected <= set(members), sorted(members)
    assert not any("machine.key" in name for name in members)

    # Every secret, searched in every member and in the whole decompressed archive.
    secrets = [PROXY_PASSWORD, COMMENT_TOKEN, *ENV_SECRETS.values(), *LOG_SECRETS, seed_b64,
               "EnvPr0xyPass-42"]
    whole = gzip.decompress(out.read_bytes())
    for secret in secrets:
        assert secret.encode() not in whole, secret
        for name, data in members.items():
            assert secret.encode() not in data, (secret, name)
    assert unb64(seed_b64) not in whole

    status = json.loads(members["status.json"])
    assert status["running"] is True and status["pid"] == agent.proc.pid  # type: ignore[union-attr]
    assert status["last_error"]["code"] == "E2004"  # hub unreachable: the proxy is down
    assert "proxy:" in members["config.yaml"].decode()
    assert f"alice:{PROXY_PASSWORD}" not in members["config.yaml"].decode()
    assert "[redacted]@127.0.0.1" in members["config.yaml"].decode()
    effective = json.loads(members["config-effective.json"])
    assert effective["settings"]["backoff_max"] == 2.0
    assert json.loads(members["registration.json"])["name"] == "bundle1"
    env = json.loads(members["environment.json"])
    assert env["OUTPOST_TOKEN"] == "[redacted]" and env["OUTPOST_ACCOUNT_KEY"] == "[redacted]"
    assert env["HTTPS_PROXY"] == "http://[redacted]@127.0.0.1:9"
    assert "MY_SERVICE_SECRET" not in env  # not one of the agent's variables
    versions = json.loads(members["versions.json"])
    assert versions["outpost"] and versions["python"] and versions["packages"]["httpx"]
    listing = [row["path"] for row in json.loads(members["state-dir.json"])]
    assert "machine.key" in listing and "registration.json" in listing
    checks = json.loads(members["check.json"])
    by_id = {c["id"]: c for c in checks["checks"]}
    assert by_id["config"]["result"] == "ok"
    assert any(c["result"] == "error" for c in checks["checks"])  # the proxy is down
    assert checks["exit_code"] == 1
    log = members["logs/agent.log"].decode()
    assert "agent " in log and "hub unreachable (" in log
    assert "Bearer [redacted]" in log and "account_key=[redacted]" in log
    assert '"password": "[redacted]"' in log and "token=[redacted]" in log
    assert took < 30


def test_a_bundle_without_a_running_agent_and_an_unwritable_target(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    out = tmp_path / "b.tar.gz"
    done = run_cli("agent", "support-bundle", "-o", str(out), "--state-dir", str(state),
                   "--no-checks", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["path"] == str(out.resolve()) and summary["bytes"] == out.stat().st_size
    members = _members(out)
    status = json.loads(members["status.json"])
    assert status["running"] is False and "outpost agent run --state-dir" in status["note"]
    assert json.loads(members["registration.json"]) == {"registered": False}
    assert "no config file" in members["config.yaml"].decode()

    blocked = tmp_path / "blocked"
    blocked.write_text("a file, not a directory")
    bad = run_cli("agent", "support-bundle", "-o", str(blocked / "b.tar.gz"), "--state-dir",
                  str(state), "--no-checks")
    assert bad.returncode == 1
    assert "E7053" in bad.stderr and str(blocked) in bad.stderr
    assert "Traceback" not in bad.stderr
