"""The support bundle redacts secrets by name and by shape, not by substrings of ordinary
words: an agent whose state directory and working directory are named like secrets
(``pwd``, ``token-tests``, ``secret-garden``) gets a bundle with its paths intact and its
README readable, and still none of the real secrets planted where the bundle collects (the
machine key, the account key, the API token, a private key, a job token)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import tarfile
from pathlib import Path

from outpost.agent.redact import REDACTED
from tests.support import OUTPOST, Agent, Hub, clean_env, register, wait_until


def _members(path: Path) -> dict[str, str]:
    with tarfile.open(path, "r:gz") as tar:
        return {m.name.split("/", 1)[1]: tar.extractfile(m).read().decode()  # type: ignore[union-attr]
                for m in tar.getmembers() if m.isfile()}


def test_paths_named_like_secrets_stay_and_real_secrets_go(
        sqlite_hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    hub = sqlite_hub
    base = tmp_path / "pwd" / "token-tests" / "secret-garden"
    state = base / "state"
    base.mkdir(parents=True)
    done = register(hub, state, "redact1")
    assert done.returncode == 0, done.stderr
    agent = Agent(state, "redact1")
    agents.append(agent.start())
    wait_until(lambda: (state / "agent.log").exists() and "agent " in
               (state / "agent.log").read_text(), 20, 0.1, "the agent's log")

    seed = (state / "machine.key").read_text().splitlines()[1].strip()
    private_pem = (hub.data_dir / "server.key").read_text()
    assert "PRIVATE KEY-----" in private_pem
    pem_body = private_pem.splitlines()[1]
    job_token = "ojt_0123456789abcdef." + "Qm9ndXNNYWNPZlRoZUpvYlRva2VuXzEyMzQ1Njc4OTA"
    # Secrets where the bundle collects, with and without a telling name around them.
    lines = [
        json.dumps({"time": "2026-01-01T00:00:00.000Z", "level": "ERROR",
                    "logger": "outpost.agent",
                    "message": f"hub said no to Authorization: Bearer {hub.admin_token}; "
                               f"retried with {hub.admin_token} and key {hub.primary_key}",
                    "seed": seed, "job_token": job_token}),
        f"a plain line: registering with {hub.primary_key} from {base}",
        "Traceback (most recent call last): the key was",
        *private_pem.splitlines(),
        f"the job ran with {job_token} in {base}/work",
    ]
    with (state / "agent.log").open("a") as fh:
        fh.write("\n".join(lines) + "\n")

    out = base / "support.tar.gz"
    env = clean_env(PWD=str(base), OLDPWD=str(base / "token-tests"),
                    PATH=f"{base}/bin:{os.environ['PATH']}",
                    OUTPOST_ACCOUNT_KEY=hub.primary_key, OUTPOST_TOKEN=hub.admin_token,
                    OUTPOST_NOTE=private_pem, OUTPOST_TOKEN_DIR=str(base / "tokens"))
    bundle = subprocess.run([*OUTPOST, "agent", "support-bundle", "-o", str(out),
                             "--state-dir", str(state), "--no-checks"],
                            capture_output=True, text=True, timeout=60, env=env, cwd=base)
    assert bundle.returncode == 0, bundle.stderr
    members = _members(out)

    # The paths, intact.
    status = json.loads(members["status.json"])
    assert status["state_dir"] == str(state), status
    environment = json.loads(members["environment.json"])
    assert environment["PATH"].startswith(f"{base}/bin:"), environment
    assert environment["OUTPOST_TOKEN_DIR"] == str(base / "tokens")
    assert environment["OUTPOST_TOKEN"] == REDACTED
    assert environment["OUTPOST_ACCOUNT_KEY"] == REDACTED
    assert environment["OUTPOST_NOTE"] == REDACTED + "\n"
    log = members["logs/agent.log"]
    assert f"registering with {REDACTED} from {base}" in log
    assert f"in {base}/work" in log and "ojt_0123456789abcdef.[redacted]" in log
    assert "Authorization: Bearer [redacted]" in log
    assert "Traceback (most recent call last): the key was\n[redacted]" in log

    # The README reads as written: the only [redacted] is the one it explains.
    readme = members["README.txt"]
    assert readme.count(REDACTED) == 1, readme
    assert "bearer [redacted]" not in readme.lower()
    assert "Paths are left as they are" in readme

    # No real secret anywhere, in any member or in the whole archive.
    whole = gzip.decompress(out.read_bytes()).decode(errors="replace")
    for secret in (seed, hub.primary_key, hub.admin_token, pem_body, job_token.split(".")[1],
                   private_pem.splitlines()[-2]):
        assert secret not in whole, secret
    assert "BEGIN OUTPOST ED25519 SEED" not in whole
