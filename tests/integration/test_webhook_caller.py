"""What ``outpost webhook create`` tells about calling the webhook: the hub's certificate
is signed by the hub's own CA, so the lines it prints to fetch and check that CA and to call
the URL must work as printed, run by a shell that has only the URL."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.support import Hub, clean_env, publish_script


def test_the_printed_curl_lines_fetch_the_ca_and_start_a_job(
        sqlite_hub: Hub, tmp_path: Path) -> None:
    hub = sqlite_hub
    publish_script(hub, tmp_path, "deploy", 'printf "%s\\n" "$body"\n', "--param", "body")
    made = hub.cli("webhook", "create", "ci", "--runbook", "deploy", "--group", "web")
    assert made.returncode == 0, made.stderr
    url = made.stdout.strip()
    assert url not in made.stderr  # the secret address is printed once, on stdout
    assert "Callers must trust the hub's CA" in made.stderr
    commands = [line.strip() for line in made.stderr.splitlines()
                if line.startswith("  ") and not line.strip().startswith("#")]
    expected = next(line.split("# must print: ", 1)[1] for line in made.stderr.splitlines()
                    if "# must print: " in line)
    assert [c.split()[0] for c in commands] == ["curl", "openssl", "curl"], commands

    caller = tmp_path / "caller"
    caller.mkdir()
    env = clean_env(URL=url)

    def sh(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                              cwd=caller, env=env, timeout=30)

    fetched = sh(commands[0])
    assert fetched.returncode == 0, fetched.stderr
    assert (caller / "outpost-ca.pem").read_text() == (hub.data_dir / "ca.pem").read_text()
    shown = sh(commands[1])
    assert shown.returncode == 0 and shown.stdout.strip() == expected.strip(), shown
    called = sh(commands[2])
    assert called.returncode == 0, called.stderr
    job = json.loads(called.stdout)
    show = hub.api("GET", f"/v1/jobs/{job['job_id']}")
    assert show.status_code == 200, show.text
    assert show.json()["params"]["body"] == '{"ref": "main"}'
