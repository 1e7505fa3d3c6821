"""The agent daemon's own entry point: ``python -m outpost.cli.agentd``.

``outpost agent run`` replaces itself with this process (same pid) so the long-running
daemon does not carry the interactive CLI's libraries (typer, click, rich): the agent's
resident memory has a 40 MB budget. Only argparse and the agent's own modules load here.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# httpx imports its optional command-line module (and with it click, rich and pygments)
# whenever click is installed. The daemon never uses it; a None entry makes that import
# fail the way httpx expects when its CLI extra is absent.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

from outpost.cli import signals  # noqa: E402
from outpost.protocol.errors import OutpostError, describe  # noqa: E402

EXIT_USAGE = 2


def run(state_dir: Path | None, config_path: Path | None, clock_skew: float) -> None:
    import asyncio

    from outpost.agent import config as agent_config
    from outpost.agent import joblogs, logs
    from outpost.agent.daemon import Agent
    from outpost.agent.state import StateDir, default_state_dir
    from outpost.agent.transport import Clock

    state = StateDir(state_dir or default_state_dir())
    if config_path is None and (state.root / "agent.yaml").exists():
        config_path = state.root / "agent.yaml"
    cfg = agent_config.load(config_path)
    # ED-1/EX-9: OUTPOST_LOG wins over the config file's log_level.
    level = logs.resolve_level(cfg.log_level, os.environ.get("OUTPOST_LOG"))
    state.ensure()
    logs.setup(state.root, level, cfg.effective().log_bytes,
               job_sink=joblogs.JobLineHandler(state.root))
    asyncio.run(Agent(state, cfg, Clock(clock_skew), config_path).run())


def main() -> None:
    parser = argparse.ArgumentParser(prog="outpost agent run",
                                     description="Run the Outpost agent daemon.")
    parser.add_argument("--state-dir", type=Path, default=None)
    parser.add_argument("--config", type=Path, default=None)
    args = parser.parse_args()
    # The daemon's loop sets its own SIGINT and SIGTERM handlers once it runs.
    signals.daemon()
    skew = os.environ.get("OUTPOST_TEST_CLOCK_SKEW", "0")  # test hook: the agent's clock only
    try:
        run(args.state_dir, args.config, float(skew or 0))
    except OutpostError as exc:
        sys.stderr.write("\n".join(describe(exc)) + "\n")
        # Exit 2 where starting again cannot help (the service unit does not restart on
        # it): a bad config, or a state directory only registering again mends (HW-9).
        sys.exit(EXIT_USAGE if exc.reason in ("config_invalid", "config_tab",
                                              "log_level_invalid", "machine_key_corrupt",
                                              "registration_corrupt") else 1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
