"""A change of a machine's own extension goal reaches its agent through the long-poll, not at
its next heartbeat: a real hub (SQLite and PostgreSQL, whose notifiers differ) and a real
agent heartbeating only every 300 s.

Both changes are made after the agent's first heartbeat, so that its next one is minutes
away; the agent must report each result within seconds, and the hub must have heard no
heartbeat in between. The hub holds a long-poll up to 120 s here (25 s by default), longer
than the whole test, so that a poll ending on its own cannot bring a change either: only the
wake-up can. The first change comes while the agent's first poll, which carried its first
heartbeat, is still held: that poll is woken too.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from tests import extbuild
from tests.support import Agent, Hub, healthy_agent, last_beat, wait_until

NAME = "woken"
OK = (b"#!/bin/sh\necho '{\"status\": \"success\"}' > "
      b"\"$OUTPOST_EXT_STATUS_DIR/$OUTPOST_EXT_SEQ.status\"\n")
INTERVAL = 300.0
WITHIN = 15.0  # roomy on a loaded machine; both changes together far below the interval


def _row(hub: Hub) -> dict[str, Any]:
    rows = hub.api("GET", "/v1/machines/m1/extensions").json()
    return next((r for r in rows if r["name"] == NAME), {})


def test_a_machine_goal_reaches_the_agent_without_waiting_for_a_heartbeat(
        new_hub: Hub, agents: list[Agent], tmp_path: Path) -> None:
    config = new_hub.data_dir / "hub.yaml"
    settings = yaml.safe_load(config.read_text()) | {"poll_timeout": 120}
    config.write_text(yaml.safe_dump(settings))
    hub = new_hub.start()
    agent = healthy_agent(hub, tmp_path, agents, "m1", heartbeat_interval=INTERVAL,
                          poll_timeout=120)
    files = {f"bin/{h}": (OK, 0o755) for h in
             ("install", "enable", "disable", "update", "uninstall")}
    published = hub.api("POST", "/v1/extensions", headers={"Content-Type": "application/gzip"},
                        content=extbuild.package(extbuild.manifest(NAME), files=files))
    assert published.status_code == 201, published.text

    beat = wait_until(lambda: last_beat(hub, "m1"), 15, what="the first heartbeat")
    sent = time.time()
    assert hub.api("PUT", f"/v1/extensions/{NAME}/targets/machine/m1",
                   json={}).status_code == 200
    ready = wait_until(lambda: (r := _row(hub)).get("state") == "Ready" and r, WITHIN, 0.05,
                       what=f"{NAME} Ready without a heartbeat\n{agent.log()[-2000:]}")
    assert ready["reported_at"] - sent < WITHIN
    assert last_beat(hub, "m1") == beat, "a heartbeat came between: nothing was shown"

    sent = time.time()
    assert hub.api("DELETE", f"/v1/extensions/{NAME}/targets/machine/m1").status_code == 200
    gone = wait_until(lambda: (r := _row(hub)).get("state") == "NotInstalled" and r, WITHIN,
                      0.05, what=f"{NAME} uninstalled without a heartbeat\n{agent.log()[-2000:]}")
    assert gone["reported_at"] - sent < WITHIN
    assert last_beat(hub, "m1") == beat, "a heartbeat came between: nothing was shown"
