"""The agent's extension dataclasses (protocol/extreaders.py) against the wire's pydantic
models (protocol/extensions.py, protocol/work.py): the same fields and defaults, what the
hub's models dump reads back equal, what the agent writes validates with the hub's models
unchanged, and a manifest or status file is refused by the reader whenever the model refuses
it, with the same code and words. The agent runs extensions without pydantic (its 40 MB
budget): this keeps its readers in step with the models the hub validates and serves."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from outpost.agent.extensions import handler, ops
from outpost.agent.extensions.channel import HttpChannel
from outpost.agent.extensions.store import Record, Update
from outpost.protocol import extensions, extpackage, extreaders, work
from outpost.protocol.errors import OutpostError
from outpost.protocol.readers import ReadError
from tests import extbuild
from tests.readers_fields import dataclass_defaults, model_defaults
from tests.support import loaded_modules

PAIRS = [(extreaders.Command, extensions.Command), (extreaders.Operation, extensions.Operation),
         (extreaders.Limits, extensions.Limits), (extreaders.Manifest, extensions.Manifest),
         (extreaders.ExtensionGoal, extensions.ExtensionGoal),
         (extreaders.ExtensionGoals, extensions.ExtensionGoals),
         (extreaders.ExtOpPayload, work.ExtOpPayload),
         (extreaders.HandlerStatusFile, extensions.HandlerStatusFile),
         (extreaders.ExtensionStatus, extensions.ExtensionStatus),
         (extreaders.ExtensionStatusReport, extensions.ExtensionStatusReport)]


@pytest.mark.parametrize(("dataclass", "model"), PAIRS, ids=[m.__name__ for _, m in PAIRS])
def test_each_dataclass_has_the_fields_and_defaults_of_its_model(dataclass: Any,
                                                                 model: Any) -> None:
    """A field added to a model fails here until the agent's dataclass has it too."""
    assert dataclass_defaults(dataclass) == model_defaults(model)


FULL_MANIFEST = {
    "schema_version": 1, "name": "backup", "version": "1.2.3-rc.1",
    "description": "snapshots", "min_agent_version": "0.9",
    "handlers": {h: {"run": f"bin/{h}", "args": ["--x"], "timeout_seconds": 60}
                 for h in extreaders.HANDLERS},
    "operations": {"snapshot": {"run": "bin/snap", "args": [], "timeout_seconds": 7200,
                                "start_timeout_seconds": 30, "expected_seconds": 90,
                                "pressure": False},
                   "restore": {"run": "./bin/restore"}},
    "limits": {"memory_mb": 256, "cpus": 1.5, "processes": 64},
    "credentials": ["backup"],
    "settings_schema": {"type": "object"}, "protected_settings_schema": {"type": "object"},
}


def _from_hub() -> list[tuple[Any, Any]]:
    """(reader, what the hub's model dumps) for each thing the hub hands the agent."""
    goal = extensions.ExtensionGoal(name="backup", version="1.2.3", sha256="ab" * 32, size=10,
                                    enabled=False, seq=7, settings={"path": "/srv"},
                                    protected="c2VhbGVk", run_as="svc", retry=2)
    return [
        (extreaders.Manifest.read, extensions.Manifest.model_validate(FULL_MANIFEST)),
        (extreaders.Manifest.read, extensions.Manifest.model_validate(
            extbuild.manifest("min", "1.0.0"))),
        (extreaders.ExtensionGoals.read, extensions.ExtensionGoals(etag="e1", goals=[goal])),
        (extreaders.ExtensionGoals.read, extensions.ExtensionGoals(etag="")),
        (extreaders.ExtOpPayload.read, work.ExtOpPayload(
            op_id="o1", extension="backup", version="1.2.3", operation="snapshot", attempt=3,
            params={"path": "/data"}, deadline=1.5e9)),
        (extreaders.ExtOpPayload.read, work.ExtOpPayload(op_id="o2", extension="b",
                                                         operation="restore")),
        (extreaders.HandlerStatusFile.read, extensions.HandlerStatusFile(
            status="error", code=-7, message="locked", result={"id": "s1"}, transient=True)),
    ]


@pytest.mark.parametrize(("reader", "sent"), _from_hub())
def test_what_the_hub_sends_reads_back_equal(reader: Any, sent: Any) -> None:
    dumped = sent.model_dump(mode="json")
    # Over JSON, as it travels: a whole float arrives as an int, which the readers take.
    assert extreaders.wire(reader(json.loads(json.dumps(dumped)))) == dumped


def _records() -> list[Record]:
    return [Record(name="a"),
            Record(name="b", version="2.0.0", stage="installed", enabled=True, enabled_seq=3,
                   last_ready="2.0.0", failed={"3.0.0": 1, "1.0.0": 0}, state="Ready",
                   message="x" * 5000, code=-2**31 + 1, changed_at=1.7e9, seq=3,
                   target="2.0.0"),
            Record(name="c", version="1.0.0", stage="installing", state="Failed",
                   step="rollback", message="E9036: it broke", code=151099, seq=2**62,
                   target="2.0.0", update=Update(old="1.0.0", new="2.0.0"))]


class _Client:
    """The agent's HubClient as the channel uses it: what it posts."""

    def __init__(self) -> None:
        self.posted: list[tuple[str, Any]] = []

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        self.posted.append((path, body))
        return {}


def test_the_agents_status_report_is_taken_by_the_hubs_model_unchanged() -> None:
    client = _Client()
    report = extreaders.ExtensionStatusReport(extensions=[r.status() for r in _records()])
    asyncio.run(HttpChannel(client).report(report))  # type: ignore[arg-type]
    (path, body), = client.posted
    assert path == "/v1/agent/extensions/status"
    sent = json.loads(json.dumps(body))
    assert extensions.ExtensionStatusReport.model_validate(sent).model_dump(mode="json") == sent
    assert [s["state"] for s in sent["extensions"]] == ["NotInstalled", "Ready", "Failed"]
    assert sent["extensions"][1]["failed_versions"] == ["1.0.0", "3.0.0"]
    assert len(sent["extensions"][1]["message"]) == 4000


def test_an_operations_reports_are_taken_by_the_hubs_models_unchanged() -> None:
    posted: list[tuple[str, Any]] = []

    async def call(method: str, path: str, body: Any = None) -> Any:
        posted.append((path, body))

    runner = ops.Operations(None, call)  # type: ignore[arg-type]
    asked = extreaders.ExtOpPayload(op_id="o1", extension="b", operation="snapshot", attempt=2)

    async def main() -> None:
        await runner._progress(asked, "waiting", "waiting: CPU 95 %")
        await runner._end(asked, True, None, "done", "out\n" * 10, {"id": "s1"})
        await runner._end(asked, False, "E9091", "m" * 5000, "o" * 100_000, None, True)

    asyncio.run(main())
    models = {"progress": work.ExtOpProgress, "end": work.ExtOpEnd}
    for path, body in posted:
        sent = json.loads(json.dumps(body))
        model = models[path.rsplit("/", 1)[1]]
        assert model.model_validate(sent).model_dump(mode="json") == sent, path


# Each refused by the model at publish; the reader refuses it too (else the agent would
# take a manifest the hub never would) and the agent's refusal says what the hub's says.
BAD_MANIFESTS = [
    {"schema_version": 2}, {"name": "Bad Name"}, {"name": 7}, {"version": "one"},
    {"min_agent_version": "x"}, {"min_agent_version": "1." * 40 + "1"},
    {"description": "d" * 4097},
    {"handlers": {"enable": {"run": "bin/enable"}}},
    {"handlers": {"enable": {"run": "bin/enable"}, "disable": {"run": "bin/disable"},
                  "reboot": {"run": "bin/enable"}}},
    {"handlers": {"enable": {"run": "../enable"}, "disable": {"run": "bin/disable"}}},
    {"handlers": {"enable": {"run": ""}, "disable": {"run": "bin/disable"}}},
    {"handlers": {"enable": {"run": "bin/enable", "timeout_seconds": 0},
                  "disable": {"run": "bin/disable"}}},
    {"handlers": {"enable": {"run": "bin/enable", "args": ["a"] * 257},
                  "disable": {"run": "bin/disable"}}},
    {"operations": {"Snap": {"run": "bin/enable"}}},
    {"operations": {"snap": {"run": "bin/enable", "expected_seconds": 8 * 86400}}},
    {"operations": {"snap": {"run": "bin/enable", "pressure": "maybe"}}},
    {"operations": {f"o{i}": {"run": "bin/enable"} for i in range(65)}},
    {"limits": {"memory_mb": 0}}, {"limits": {"cpus": 2000}}, {"limits": {"processes": 2**31}},
    {"credentials": ["ssh"]}, {"settings_schema": [1]},
]


def _manifest(change: dict[str, Any]) -> dict[str, Any]:
    return {**extbuild.manifest("demo", "1.0.0"), **change}


@pytest.mark.parametrize("change", BAD_MANIFESTS)
def test_a_manifest_the_hub_refuses_the_agent_refuses_with_the_same_words(
        change: dict[str, Any]) -> None:
    manifest = _manifest(change)
    with pytest.raises(ReadError):
        extreaders.Manifest.read(manifest)
    data = extbuild.package(manifest, files={f"bin/{h}": (b"#!/bin/sh\n", 0o755)
                                             for h in extreaders.HANDLERS})
    with pytest.raises(OutpostError) as at_publish:
        extpackage.read(data)
    with pytest.raises(OutpostError) as on_agent:
        extpackage.read(data, light=True)
    assert at_publish.value.code == on_agent.value.code == "E9000"
    assert on_agent.value.message == at_publish.value.message
    assert "outpost-extension.json: " in on_agent.value.message


def test_what_the_model_converts_the_agent_takes_as_before() -> None:
    """Pydantic converts a number written as a string; such a package, accepted at publish,
    is read on the agent too, through the model (``read_lax``)."""
    manifest = _manifest({"limits": {"memory_mb": "64"}})
    manifest["handlers"]["enable"]["timeout_seconds"] = "30"
    package = extpackage.read(extbuild.package(manifest), light=True)
    assert isinstance(package.manifest, extreaders.Manifest)
    assert package.manifest.limits.memory_mb == 64
    assert package.manifest.handlers["enable"].timeout_seconds == 30.0


def test_the_agent_unpacks_a_package_without_pydantic(tmp_path: Path) -> None:
    data = extbuild.package(FULL_MANIFEST, files={
        f"bin/{h}": (b"#!/bin/sh\n", 0o755) for h in (*extreaders.HANDLERS, "snap",
                                                      "restore")})
    (tmp_path / "pkg").write_bytes(data)
    loaded = loaded_modules(f"""
from pathlib import Path
from outpost.protocol import extpackage
data = Path({str(tmp_path / 'pkg')!r}).read_bytes()
package = extpackage.unpack(data, Path({str(tmp_path / 'out')!r}), extpackage.digest(data),
                            light=True)
assert package.manifest.operations["snapshot"].pressure is False, package
assert package.manifest.credentials == ["backup"], package
""")
    assert "outpost.protocol.extreaders" in loaded
    assert "pydantic" not in loaded and "outpost.protocol.extensions" not in loaded


@pytest.mark.parametrize(("written", "why"), [
    ({"status": "done"}, "status: Input should be 'transitioning', 'success', 'warning' or "
                         "'error'"),
    ({"status": "error", "code": 2**31}, "code: Input should be less than or equal to "),
    ({"status": "success", "result": [1]}, "result: Input should be a valid dictionary"),
    ([], "(the file): Input should be a valid dictionary"),
])
def test_a_malformed_status_file_names_the_file_and_why(tmp_path: Path, written: Any,
                                                        why: str) -> None:
    path = tmp_path / "3.status"
    path.write_text(json.dumps(written))
    status, malformed = handler.read_status(path)
    assert status is None and malformed is not None
    assert malformed.startswith(f"{path} is not a status file: {why}"), malformed


def test_a_status_file_is_read_without_pydantic_and_as_the_model_converts(
        tmp_path: Path) -> None:
    good, lax = tmp_path / "1.status", tmp_path / "2.status"
    good.write_text('{"status": "warning", "code": 3, "message": "m", "result": {"id": 1}}')
    lax.write_text('{"status": "error", "code": "4", "transient": "true"}')
    loaded = loaded_modules(f"""
from pathlib import Path
from outpost.agent.extensions.handler import read_status
status, malformed = read_status(Path({str(good)!r}))
assert malformed is None and (status.status, status.code, status.result) == (
    "warning", 3, {{"id": 1}}), (status, malformed)
""")
    assert "pydantic" not in loaded
    status, malformed = handler.read_status(lax)
    assert malformed is None and status is not None
    assert (status.status, status.code, status.transient) == ("error", 4, True)


def test_a_malformed_operation_item_is_e8151_naming_the_field() -> None:
    from outpost.agent import work as agent_work

    item = agent_work.registry._handlers["ext_op"]
    with pytest.raises(OutpostError) as refused:
        item.read({"id": "w1", "kind": "ext_op",
                   "payload": {"op_id": "o1", "extension": "b" * 65, "attempt": 0}})
    assert refused.value.code == "E8151"
    for field in ("extension: at most 64 characters", "operation: required",
                  "attempt: 0 is under 1"):
        assert field in refused.value.message, refused.value.message
