"""The hub's API, one router per concept; ``app.create_app`` includes them in this order.

Each module exposes ``router`` (an ``APIRouter``); its handlers are thin (parse, call the
concept module, answer) and reach the hub through ``deps.HubDep``. Operator request models
live with their router; what agents send is in ``outpost.protocol.models``.
"""

from __future__ import annotations

from fastapi import APIRouter

from . import accounts, agents, assets, groups, hub, jobs, machines, messages, runbooks, schedules
from . import (backups, credentials, deployments, extension_ops, extensions, fanouts, recovery,
               restic, tokens, webhooks)

# The order of the paths in /openapi.json, and of matching: a literal path
# (/v1/assets/variables/{name}) before the pattern that would also take it.
ROUTERS: tuple[APIRouter, ...] = (
    hub.router, agents.router, accounts.router, tokens.router, machines.router,
    messages.router,
    runbooks.router, jobs.router, fanouts.router, groups.router, assets.router, schedules.router,
    webhooks.router, extensions.router, extension_ops.router, deployments.router, backups.router,
    recovery.router,
    restic.router,
    credentials.router, hub.dist)
