"""The extensions shipped with Outpost (each a package the hub publishes for its first account
when it starts: ``outpost hub init`` then ``hub start``, or ``outpost up``)."""

from __future__ import annotations

import logging
from typing import Any

from outpost.protocol.errors import OutpostError

log = logging.getLogger("outpost.hub")


async def publish_shipped(extensions: Any, account_id: str) -> list[dict[str, Any]]:
    """Publish the shipped packages (the backup and recovery extensions) for the hub's first
    account, at every start: a version already there with the same bytes is left as it is, so
    this is idempotent, and an upgraded Outpost publishes its new version beside the old. A
    version the operator published with other bytes under the same name is kept, with a
    warning."""
    from . import backup, recovery

    done = []
    for shipped in (backup, recovery):
        try:
            info, _new = await extensions.publish(account_id, shipped.build())
            done.append(info)
        except OutpostError as exc:
            log.warning("the shipped %s extension %s was not published: %s %s",
                        shipped.NAME, shipped.version(), exc.code, exc.message)
    return done
