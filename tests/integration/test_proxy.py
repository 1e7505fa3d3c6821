"""EX-6: the agent works through an HTTP(S) proxy that tunnels without intercepting.

One SQLite hub serves the module (``module_hub``): each test registers a machine of
its own name and reads nothing else of the hub."""

from __future__ import annotations

from pathlib import Path

from tests.proxy import connect_proxy
from tests.support import MODULE_HUB_SQLITE_ONLY, Agent, Hub, clean_env, run_cli, wait_until

# SQLite only: the agent's way through a proxy, not the database.
pytestmark = MODULE_HUB_SQLITE_ONLY


def test_register_and_heartbeat_through_a_proxy(module_hub: Hub, agents: list[Agent],
                                                tmp_path: Path) -> None:
    hub = module_hub
    with connect_proxy() as proxy:
        state = tmp_path / "agent"
        done = run_cli(*hub.register_args(state, "behind-proxy"), "--proxy", proxy.url)
        assert done.returncode == 0, done.stderr
        assert any(t.endswith(f":{hub.port}") for t in proxy.tunnels)
        before = len(proxy.tunnels)
        agent = Agent(state, "behind-proxy", {"heartbeat_interval": 1, "proxy": proxy.url})
        agents.append(agent.start())
        wait_until(lambda: hub.machines()["behind-proxy"]["status"] == "Healthy", 15,
                   what="a heartbeat through the proxy")
        assert len(proxy.tunnels) > before  # the agent's own connection went through it


def test_https_proxy_variable_is_honoured(module_hub: Hub, tmp_path: Path) -> None:
    hub = module_hub
    with connect_proxy() as proxy:
        env = clean_env(HTTPS_PROXY=proxy.url)
        done = run_cli(*hub.register_args(tmp_path / "agent", "env-proxy"), env=env)
        assert done.returncode == 0, done.stderr
        assert proxy.tunnels, "registration did not use HTTPS_PROXY"


def test_a_refusing_proxy_is_reported_as_a_proxy_failure(module_hub: Hub, agents: list[Agent],
                                                         tmp_path: Path) -> None:
    hub = module_hub
    state = tmp_path / "agent"
    done = run_cli(*hub.register_args(state, "refused-by-proxy"))
    assert done.returncode == 0, done.stderr
    with connect_proxy(refuse=True) as proxy:
        agent = Agent(state, "refused-by-proxy", {"heartbeat_interval": 1, "proxy": proxy.url})
        agents.append(agent.start())
        wait_until(lambda: "hub unreachable (proxy)" in agent.log(), 15,
                   what="the agent to log a proxy failure")
        assert proxy.refused
        assert agent.proc is not None and agent.proc.poll() is None  # still running
