"""Outpost: a hub and an outbound-only agent for running work on unreachable machines."""

__version__ = "0.1.0"
