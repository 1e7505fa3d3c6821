"""Extensions on the machine: packages the hub hands this agent, installed, enabled,
updated, rolled back and uninstalled as their goals say (docs/extensions.md, "On the
machine").

- ``reconcile.py``: the goals made real, one persisted step at a time, and the reports;
- ``handler.py``: one command of an installed extension run to its end (handlers now,
  operations next), in its process group and control group, within its timeout;
- ``runtime.py``: where extensions live, who their commands run as, their control groups;
- ``store.py``: what the agent knows of them (``<state>/extensions/state.json``);
- ``channel.py``: the seam to the hub; ``outlog.py``: each extension's own log.
"""
