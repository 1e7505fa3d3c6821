"""The agent's edge-module dataclasses (protocol/modreaders.py) against the wire's pydantic
models (protocol/modules.py): the same fields and defaults, a deployment the hub dumps reads
back equal, and what the agent writes (reports, upstream batches) validates with the hub's
models. The agent runs modules without pydantic (its 40 MB budget): this is what keeps its
readers in step with the models the hub validates, serves and documents."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import pytest

from outpost.agent.modules import upstream
from outpost.agent.modules.channel import HttpChannel
from outpost.agent.modules.supervisor import spec_hash
from outpost.protocol import extensions, modreaders, modules, routes
from outpost.protocol.errors import OutpostError
from outpost.protocol.readers import ReadError
from tests.readers_fields import dataclass_defaults, model_defaults

PAIRS = [(modreaders.PackageRef, modules.PackageRef), (modreaders.Backoff, modules.Backoff),
         (modreaders.HealthProbe, modules.HealthProbe), (modreaders.Limits, extensions.Limits),
         (modreaders.ModuleSpec, modules.ModuleSpec), (modreaders.RouteSpec, modules.RouteSpec),
         (modreaders.MessageHubSettings, modules.MessageHubSettings),
         (modreaders.DeploymentManifest, modules.DeploymentManifest),
         (modreaders.DeploymentDoc, modules.DeploymentDoc),
         (modreaders.ModuleCommand, modules.ModuleCommand),
         (modreaders.ModulePackageManifest, modules.ModulePackageManifest),
         (modreaders.ModuleStatus, modules.ModuleStatus),
         (modreaders.MessageCounters, modules.MessageCounters),
         (modreaders.ModulesReport, modules.ModulesReport),
         (modreaders.UpstreamMessage, modules.UpstreamMessage),
         (modreaders.UpstreamBatch, modules.UpstreamBatch),
         (modreaders.UpstreamAck, modules.UpstreamAck)]


@pytest.mark.parametrize(("dataclass", "model"), PAIRS, ids=[m.__name__ for _, m in PAIRS])
def test_each_dataclass_has_the_fields_and_defaults_of_its_model(dataclass: Any,
                                                                 model: Any) -> None:
    """A field added to a model fails here until the agent's dataclass has it too."""
    assert dataclass_defaults(dataclass) == model_defaults(model)


MANIFEST = """
schema_version: 1
modules:
  sensor:
    package: {name: sensor, version: 1.2.0, sha256: "%s"}
    args: [--fast]
    env: {MODE: hot}
    restart_policy: on-unhealthy
    order: 2
    health: {http: "http://127.0.0.1:8080/ok", interval_seconds: 2, failures: 2}
    limits: {memory_mb: 64, cpus: 1, processes: 32}
    dns: [10.0.0.53]
    ports: [8080]
    backoff: {base_seconds: 1, cap_seconds: 30, max_restarts: 4}
    run_as: sensors
    stop_timeout_seconds: 3
  filter:
    command: [/usr/bin/python3, -u, /opt/filter.py]
    status: stopped
    health: {command: [/bin/true], start_period_seconds: 5}
routes:
  hot: >-
    FROM /messages/modules/sensor/outputs/temp WHERE temperature > 30
    INTO BrokeredEndpoint("/modules/filter/inputs/hot")
  up: {route: "FROM /messages/modules/filter/outputs/* INTO $upstream", priority: 3,
       ttl_seconds: 60}
message_hub: {ttl_seconds: 600, store_max_mb: 16, max_message_kb: 64, constrained: true}
""" % ("a" * 64)


def _hub_doc() -> dict[str, Any]:
    """A deployment as the hub serves it: validated, then dumped by its model."""
    manifest, _ = modules.load_manifest(MANIFEST)
    return modules.DeploymentDoc(etag="e1", deployment="plant", version=4,
                                 manifest=manifest).model_dump(mode="json")


@pytest.mark.parametrize("doc", [_hub_doc(), {"etag": "e0"},
                                 modules.DeploymentDoc(etag="e2").model_dump(mode="json")])
def test_a_deployment_the_hub_dumps_reads_back_equal(doc: dict[str, Any]) -> None:
    read = modreaders.DeploymentDoc.read(doc)
    assert modreaders.wire(read) == modules.DeploymentDoc.model_validate(doc).model_dump(
        mode="json")
    # What the supervisor saves reads back the same (its state file).
    assert modreaders.DeploymentDoc.read(json.loads(json.dumps(modreaders.wire(read)))) == read


def test_a_module_keeps_its_spec_hash_so_an_upgraded_agent_adopts_it() -> None:
    """The supervisor's state records each module's spec hash, made by agents before this
    one from the model's dump: the same spec must give the same hash, or an agent upgrade
    would restart every module."""
    doc = _hub_doc()
    model = modules.DeploymentDoc.model_validate(doc)
    read = modreaders.DeploymentDoc.read(doc)
    assert model.manifest is not None and read.manifest is not None
    for name, spec in model.manifest.modules.items():
        before = json.dumps(spec.model_dump(mode="json"), sort_keys=True,
                            separators=(",", ":"))
        assert spec_hash(read.manifest.modules[name]) == hashlib.sha256(
            before.encode()).hexdigest()[:16]


def test_routes_compile_the_same_from_the_agent_dataclass() -> None:
    manifest, compiled = modules.load_manifest(MANIFEST)
    read = modreaders.DeploymentManifest.read(manifest.model_dump(mode="json"))
    again = routes.compile_all(read.route_texts(), read.modules)
    assert again.keys() == compiled.keys()
    assert [(r.source, r.sink) for r in again.values()] == [
        (r.source, r.sink) for r in compiled.values()]
    with pytest.raises(routes.RouteProblem, match="no module 'ghost'") as caught:
        routes.compile_all({"x": "FROM /messages/modules/ghost/* INTO $upstream"}, read.modules)
    assert caught.value.name == "x" and caught.value.column == 6


def test_a_package_manifest_reads_as_the_model_reads_it() -> None:
    data = {"name": "sensor", "version": "1.2.0", "description": "reads",
            "run": {"run": "bin/sensor", "args": ["-v"]}, "later": True}
    assert modreaders.wire(modreaders.ModulePackageManifest.read(data)) == (
        modules.ModulePackageManifest.model_validate(data).model_dump(mode="json"))


def test_what_the_agent_writes_validates_with_the_hub_models() -> None:
    status = modreaders.ModuleStatus(name="sensor", state="backoff", pid=None, exit_code=137,
                                     restart_count=2, last_start_at=1.5, last_exit_at=2.5,
                                     next_try_at=12.5, healthy=False, version="1.2.0",
                                     reason="it was killed by SIGKILL (exit 137)")
    counters = modreaders.MessageCounters(received=5, delivered=1, filtered=1, refused=2)
    report = modreaders.ModulesReport(reported_at=3.0, deployment="plant", version=4,
                                      etag="e1", modules=[status], messages=counters,
                                      error="E9167 the routes do not compile")
    sent = modreaders.wire(report)
    assert modules.ModulesReport.model_validate(sent).model_dump(mode="json") == sent
    empty = modreaders.wire(modreaders.ModulesReport(reported_at=1.0))
    assert modules.ModulesReport.model_validate(empty).model_dump(mode="json") == empty

    record = {"seq": 7, "module": "filter", "output": "alerts", "properties": {"level": 1},
              "content_type": "text/plain", "message_id": "m1", "correlation_id": None,
              "body": "YWxlcnQ=", "created_at": 9.5, "route": "up", "expires_at": 99.0}
    batch = modreaders.wire(modreaders.UpstreamBatch(messages=[upstream.wire(record)],
                                                     dropped_expired=2))
    assert modules.UpstreamBatch.model_validate(batch).model_dump(mode="json") == batch
    assert "expires_at" not in batch["messages"][0]  # the store's own field stays home
    assert modreaders.UpstreamAck.read({"accepted_through": 7}).accepted_through == 7


REFUSED = [
    ({"etag": "e", "manifest": {"modules": {"m": {"command": ["/bin/x"],
                                                  "backoff": {"base_seconds": "fast"}}}}},
     "manifest.modules.m.backoff.base_seconds: a finite number was expected"),
    ({"etag": "e", "manifest": {"modules": {"m": {"command": "/bin/x"}}}},
     "manifest.modules.m.command: a list was expected"),
    ({"etag": "e", "manifest": {"modules": {"m": {}}}},
     "manifest.modules.m.give exactly one of 'package' and 'command'"),
    ({"etag": "e", "manifest": {"routes": {"r": {"priority": 1}}}},
     "manifest.routes.r.route: required"),
    ({"etag": "e", "manifest": {"message_hub": {"constrained": "maybe"}}},
     "manifest.message_hub.constrained: true or false"),
    ({"etag": 5}, "etag: a string was expected"),
    ([], "an object was expected"),
]


@pytest.mark.parametrize(("doc", "named"), REFUSED)
def test_a_field_the_agent_cannot_read_is_named(doc: Any, named: str) -> None:
    with pytest.raises(ReadError) as caught:
        modreaders.DeploymentDoc.read(doc)
    assert named in str(caught.value)
    with pytest.raises(ValueError):  # the hub's model refuses it too
        modules.DeploymentDoc.model_validate(doc)


class _Client:
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        return self.answer


def test_a_deployment_from_a_hub_of_another_version_is_e9173_not_a_traceback() -> None:
    channel = HttpChannel(_Client({"etag": "e", "manifest": {"modules": {"m": {
        "command": ["/bin/x"], "ports": ["http"]}}}}))  # type: ignore[arg-type]
    with pytest.raises(OutpostError) as caught:
        asyncio.run(channel.fetch_deployment())
    assert caught.value.code == "E9173"
    assert "manifest.modules.m.ports: item 0: an integer was expected" in caught.value.message
    assert "does not fit this agent" in caught.value.message


def test_the_agent_side_imports_no_pydantic() -> None:
    from tests.support import loaded_modules

    loaded = loaded_modules("import outpost.agent.modules.hook, outpost.protocol.modreaders")
    assert sorted(m for m in loaded if m.split(".")[0] in ("pydantic", "pydantic_core")
                  or m in ("outpost.protocol.modules", "outpost.protocol.extensions")) == []
