"""Webhooks end to end: a secret URL, a real POST, a real agent, on both databases."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx

from tests.support import Agent, Hub, query, registered_agent, wait_until


def _publish(hub: Hub, tmp_path: Path, name: str, body: str, *extra: str) -> None:
    script = tmp_path / f"{name}.sh"
    script.write_text("#!/bin/bash\n" + body)
    done = hub.cli("runbook", "publish", name, str(script), *extra)
    assert done.returncode == 0, done.stderr


def _api(hub: Hub, method: str, path: str, token: str | None = None, status: int = 200,
         **kw: Any) -> Any:
    response = hub.api(method, path, token, **kw)
    assert response.status_code == status, (response.status_code, response.text)
    return response.json()


def _refused(result: Any, code: str, exit_code: int) -> str:
    assert result.returncode == exit_code, (result.returncode, result.stdout, result.stderr)
    err: str = result.stderr
    assert f"code:   {code}" in err and "fix:" in err, err
    assert "Traceback" not in err, err
    return err


def _post(hub: Hub, url: str, body: bytes | str = b"", **kw: Any) -> httpx.Response:
    """A caller with only the URL: no token."""
    with httpx.Client(verify=hub.ssl_context(), timeout=30) as client:
        return client.post(url, content=body, **kw)


def _webhook(hub: Hub, name: str, runbook: str, token: str | None = None,
             **extra: Any) -> str:
    made = _api(hub, "POST", "/v1/webhooks", token, status=201, json={
        "name": name, "runbook": runbook, "group": "web", **extra})
    url: str = made["url"]
    return url


def _finished(hub: Hub, job_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job: dict[str, Any] = _api(hub, "GET", f"/v1/jobs/{job_id}")
        return job if job["status"] in ("Completed", "Failed") else None

    return wait_until(done, 15, 0.1, f"job {job_id} to finish")


def test_the_url_is_shown_once_and_a_post_starts_a_job_with_the_body(
        hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    _publish(hub, tmp_path, "deploy", 'printf "%s\\n" "$body"\necho "env=$env"\n',
             "--param", "body", "--param", "env=prod")
    agents.append(registered_agent(hub, tmp_path, "w1").start())
    made = hub.cli("webhook", "create", "github", "--runbook", "deploy", "--group", "web",
                   "--param", "env=staging")
    assert made.returncode == 0, made.stderr
    url = made.stdout.strip()
    assert url.startswith(f"{hub.url}/v1/hooks/") and len(url.rsplit("/", 1)[1]) >= 43
    assert "not shown again" in made.stderr and url not in made.stderr
    secret = url.rsplit("/", 1)[1]

    listing = hub.cli("webhook", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    [listed] = json.loads(listing.stdout)
    assert listed["name"] == "github" and listed["expires_at"] is None
    assert listed["params"] == {"env": "staging"} and listed["last_job_id"] is None
    assert secret not in listing.stdout and "url" not in listed

    payload = '{"ref": "refs/heads/main", "message": "héllo $HOME `x`"}'
    response = _post(hub, url, payload.encode(), headers={"Content-Type": "application/json"})
    assert response.status_code == 202, response.text
    job = _finished(hub, response.json()["job_id"])
    assert job["status"] == "Completed", job
    assert job["params"] == {"body": payload, "env": "staging"}
    records = _api(hub, "GET", f"/v1/jobs/{job['id']}/output")
    assert [r["text"] for r in records] == [payload, "env=staging"]  # as sent, not expanded

    text = hub.cli("webhook", "list")
    assert "github" in text.stdout and secret not in text.stdout
    [listed] = _api(hub, "GET", "/v1/webhooks")
    assert listed["last_job_id"] == job["id"] and listed["last_used_at"] >= job["created_at"]

    # An empty body is an empty parameter; a body must be UTF-8 and at most 64 KiB.
    empty = _post(hub, url)
    assert empty.status_code == 202
    assert _finished(hub, empty.json()["job_id"])["params"]["body"] == ""
    binary = _post(hub, url, b"\xff\xfe")
    assert binary.status_code == 422 and binary.json()["code"] == "E3003"
    large = _post(hub, url, b"x" * (64 * 1024 + 1))
    assert large.status_code == 413 and large.json()["code"] == "E6007"
    assert _post(hub, url, b"x" * (64 * 1024)).status_code == 202

    removed = hub.cli("webhook", "remove", "github")
    assert removed.returncode == 0 and "Removed webhook github." in removed.stdout
    gone = _post(hub, url, b"{}")
    assert gone.status_code == 404 and gone.json()["code"] == "E6006"


def test_unknown_and_expired_hooks_answer_404(hub: Hub, tmp_path: Path) -> None:
    _publish(hub, tmp_path, "hook", "true\n", "--param", "body:json")
    _publish(hub, tmp_path, "plain", "true\n")
    for path in ("/v1/hooks/" + "A" * 43, "/v1/hooks/x", "/v1/hooks/" + "y" * 500):
        response = _post(hub, hub.url + path, b"{}")
        assert response.status_code == 404, response.text
        assert response.json()["code"] == "E6006"
        assert response.json()["message"] == "No webhook answers at this address."

    soon = (datetime.now(timezone.utc) + timedelta(seconds=3)).isoformat()
    url = _webhook(hub, "short-lived", "hook", expires=soon)
    response = _post(hub, url, b'{"ok": true}')
    assert response.status_code == 202, response.text
    job = _api(hub, "GET", f"/v1/jobs/{response.json()['job_id']}")
    assert job["params"] == {"body": {"ok": True}}  # a json parameter is parsed
    bad_json = _post(hub, url, b"{not json")
    assert bad_json.status_code == 422 and bad_json.json()["code"] == "E4003"
    assert "{not json" not in bad_json.text  # the body is not echoed back

    wait_until(lambda: _post(hub, url, b"{}").status_code == 404, 10, 0.2, "the expiry")
    expired = _post(hub, url, b"{}").json()
    assert expired["code"] == "E6006"
    [listed] = _api(hub, "GET", "/v1/webhooks")
    assert listed["expired"] is True
    assert "(expired)" in hub.cli("webhook", "list").stdout

    # Bad input: a clear code, nothing stored.
    def create(*args: str) -> Any:
        return hub.cli("webhook", "create", "w2", "--group", "web", *args)

    assert "already past" in _refused(create("--runbook", "hook", "--expires", "2001-01-01"),
                                      "E6004", 2)
    _refused(create("--runbook", "hook", "--expires", "next tuesday"), "E6004", 2)
    assert "'body'" in _refused(create("--runbook", "plain"), "E6005", 2)
    _refused(create("--runbook", "nope"), "E3002", 1)
    for change, code in (({"params": {"body": "fixed"}}, "E4003"),
                         ({"params": {"other": "1"}}, "E4003"),
                         ({"group": "bad group!"}, "E3003"),
                         ({"name": "bad name!"}, "E3003"),
                         ({"name": "short-lived"}, "E3009")):
        response = hub.api("POST", "/v1/webhooks", json={
            "name": "w2", "runbook": "hook", "group": "web", **change})
        assert 400 <= response.status_code < 500 and response.json()["code"] == code, \
            (change, response.text)
    assert [w["name"] for w in _api(hub, "GET", "/v1/webhooks")] == ["short-lived"]


def _database_text(database_url: str, db_path: Path) -> bytes:
    """Everything the database holds, as bytes: the SQLite files (with the WAL), or every
    row of every table on PostgreSQL."""
    if database_url.startswith("sqlite:///"):
        return b"".join(p.read_bytes() for p in db_path.parent.glob(db_path.name + "*"))
    tables = [r[0] for r in query(database_url, "SELECT tablename FROM pg_tables "
                                                "WHERE schemaname = 'public'")]
    dump = []
    for table in tables:
        dump += [str(r[0]) for r in query(database_url, f'SELECT t::text FROM "{table}" t')]
    return "\n".join(dump).encode()


def test_the_secret_is_kept_only_as_a_hash(hub: Hub, tmp_path: Path) -> None:
    _publish(hub, tmp_path, "hook", "true\n", "--param", "body")
    url = _webhook(hub, "audit", "hook")
    secret = url.rsplit("/", 1)[1]
    assert _post(hub, url, b"ping").status_code == 202
    assert _post(hub, url.replace(secret, secret[:-1]), b"ping").status_code == 404
    # The hub writes a request's log lines before it answers; waiting for the first one
    # rules out a buffered file.
    wait_until(lambda: "webhook audit" in hub.log(), 10, what="the webhook's log line")

    db_path = Path(hub.database_url[len("sqlite:///"):]) if hub.database_url.startswith(
        "sqlite:///") else Path("/nonexistent")
    stored = _database_text(hub.database_url, db_path)
    assert hashlib.sha256(secret.encode()).hexdigest().encode() in stored  # looked right
    assert secret.encode() not in stored
    assert secret[:20].encode() not in stored
    log = hub.log()
    assert "webhook audit" in log  # the hub logs the webhook by name...
    assert secret[:20] not in log  # ...and never its address


def test_webhooks_are_isolated_between_accounts(hub: Hub, tmp_path: Path) -> None:
    _publish(hub, tmp_path, "hook", "true\n", "--param", "body")
    mine = _webhook(hub, "shared-name", "hook")
    other = _api(hub, "POST", "/v1/accounts", status=201, json={"name": "other"})["token"]

    assert json.loads(hub.cli("webhook", "list", "--json", token=other).stdout) == []
    _refused(hub.cli("webhook", "remove", "shared-name", token=other), "E3002", 1)
    refused = _api(hub, "POST", "/v1/webhooks", other, status=404, json={
        "name": "x", "runbook": "hook", "group": "web"})  # this account's runbook
    assert refused["code"] == "E3002"

    script = tmp_path / "theirs.sh"
    script.write_text("#!/bin/bash\ntrue\n")
    assert _api(hub, "POST", "/v1/runbooks", other, status=201, json={
        "name": "hook", "content": script.read_text(), "params": ["body"]})["version"] == 1
    theirs = _webhook(hub, "shared-name", "hook", token=other)  # the same name is theirs
    assert theirs != mine

    started = _post(hub, mine, b"for me").json()["job_id"]
    assert [j["id"] for j in _api(hub, "GET", "/v1/jobs")] == [started]
    assert _api(hub, "GET", "/v1/jobs", other) == []
    assert _api(hub, "GET", f"/v1/jobs/{started}", other, status=404)["code"] == "E3002"
    assert [w["name"] for w in _api(hub, "GET", "/v1/webhooks")] == ["shared-name"]
