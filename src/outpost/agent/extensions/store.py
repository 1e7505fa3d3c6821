"""What the agent knows of its extensions, kept in ``<state>/extensions/state.json`` and
written atomically after every step (a temporary file, fsync, rename: state.py), so that an
agent started again goes on from the last step that finished rather than running it again.

Per extension a ``Record``: the version installed now and how far it got (``stage``), the
settings sequence its enable ran with, the last version that was Ready, the versions that
failed (not tried again until the goal's ``retry`` grows past the value noted), an update
under way (so a restart in its middle finishes or rolls it back), and the status last
reported. Protected settings are never in it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..state import atomic_write

if TYPE_CHECKING:
    from outpost.protocol.extreaders import ExtensionStatus, State, Step

log = logging.getLogger("outpost.agent.extensions")

STATE_FILE = "state.json"
# unpacked: on disk, install not run; installing: install started (an uninstall must run);
# installed: install succeeded.
Stage = Literal["unpacked", "installing", "installed"]


@dataclass
class Update:
    """An update under way from ``old`` to ``new``: the steps done so far."""

    old: str
    new: str
    done: list[str] = field(default_factory=list)
    failed_step: str | None = None
    failure: str = ""
    failure_code: int | None = None


@dataclass
class Record:
    name: str
    version: str | None = None  # installed (or being installed) now
    stage: Stage | None = None
    enabled: bool = False
    enabling: bool = False  # an enable started (a disable must run before an uninstall)
    enabled_seq: int | None = None
    last_ready: str | None = None
    failed: dict[str, int] = field(default_factory=dict)  # version -> goal.retry then
    update: Update | None = None
    state: State = "NotInstalled"
    step: Step | None = None
    message: str = ""
    code: int | None = None
    changed_at: float = field(default_factory=time.time)
    seq: int = 0
    target: str | None = None
    run_as: str | None = None

    def status(self) -> ExtensionStatus:
        # Imported here: the daemon reads the store at start, before it knows whether the
        # machine has extensions at all, without the extensions' readers.
        from outpost.protocol.extreaders import ExtensionStatus

        return ExtensionStatus(
            name=self.name, version=self.version if self.stage == "installed" else None,
            target_version=self.target, state=self.state, step=self.step,
            message=self.message[:4000], code=self.code, changed_at=self.changed_at,
            seq=self.seq, failed_versions=sorted(self.failed)[:64],
            last_ready_version=self.last_ready)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        update = data.pop("update", None)
        record = cls(**data)
        record.update = Update(**update) if update else None
        return record


class Store:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE
        self.etag = ""  # of the goals last reconciled to the end
        self.records: dict[str, Record] = {}

    def load(self) -> None:
        """Read the file; a corrupt one is moved aside (the agent then starts from nothing
        known and the next reconcile installs what is wanted again)."""
        try:
            raw = json.loads(self.path.read_bytes())
            records = {name: Record.from_dict(dict(value))
                       for name, value in raw["extensions"].items()}
            etag = str(raw.get("etag", ""))
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            aside = self.path.with_name(f"{STATE_FILE}.corrupt-{int(time.time())}")
            try:
                self.path.replace(aside)
            except OSError:
                pass
            log.error("extensions: %s is unreadable (%s); moved aside to %s, starting from "
                      "no extension known", self.path, exc, aside.name)
            return
        self.records, self.etag = records, etag

    def save(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = {"etag": self.etag,
                "extensions": {n: r.to_dict() for n, r in sorted(self.records.items())}}
        atomic_write(self.path, json.dumps(data, indent=1).encode())
