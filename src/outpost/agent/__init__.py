"""The agent: registers a machine, heartbeats, long-polls the hub for work.

Installs and runs with the base dependencies only; imports nothing from ``outpost.hub``.
"""
