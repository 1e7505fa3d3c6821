"""Reading a deployment manifest (protocol/modules.py): a good one in YAML and JSON, and
every kind of bad one refused with the field, line and column."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from outpost.protocol import extpackage
from outpost.protocol.errors import OutpostError
from outpost.protocol.modules import load_manifest, manifest_schema

GOOD = """\
modules:
  sensor:
    command: [/usr/bin/python3, -m, sensor]
    restart_policy: on-failure
    backoff: {base_seconds: 0.5, cap_seconds: 4, max_restarts: 3}
    health:
      http: http://127.0.0.1:8080/health
      failures: 2
  filter:
    package: {name: filt, version: 1.0.0}
    ports: [8080]
    dns: [10.0.0.2]
    order: 1
routes:
  hot: >-
    FROM /messages/modules/sensor/outputs/* WHERE t > 3
    INTO BrokeredEndpoint("/modules/filter/inputs/in")
  up: {route: "FROM /messages/modules/filter/* INTO $upstream", priority: 1, ttl_seconds: 60}
"""


def refusal(text: str) -> OutpostError:
    with pytest.raises(OutpostError) as caught:
        load_manifest(text)
    assert caught.value.code == "E9150"
    return caught.value


def test_a_good_manifest_and_its_defaults() -> None:
    manifest, compiled = load_manifest(GOOD)
    sensor, filt = manifest.modules["sensor"], manifest.modules["filter"]
    assert sensor.restart_policy == "on-failure" and sensor.status == "running"
    assert sensor.backoff.base_seconds == 0.5 and sensor.backoff.reset_after_seconds == 600
    assert filt.backoff.base_seconds == 10 and filt.backoff.cap_seconds == 300
    assert filt.backoff.max_restarts == 20 and filt.restart_policy == "always"
    assert filt.package is not None and filt.package.version == "1.0.0"
    assert manifest.routes["up"].priority == 1 and manifest.routes["hot"].ttl_seconds is None
    assert compiled["hot"].sink.module == "filter" and compiled["up"].sink.upstream
    assert manifest.message_hub.ttl_seconds == 7200 and not manifest.message_hub.constrained


def test_json_is_taken_too() -> None:
    manifest, _ = load_manifest(json.dumps({
        "modules": {"a": {"command": ["/bin/sleep", "60"]}},
        "routes": {"r": "FROM /messages/modules/a/* INTO $upstream"}}))
    assert manifest.modules["a"].command == ["/bin/sleep", "60"]


@pytest.mark.parametrize(("change", "field", "line", "column", "words"), [
    (("on-failure", "sometimes"), "modules.sensor.restart_policy", 4, 21, "'always'"),
    (("http://127.0.0.1:8080", "http://10.0.0.1:8080"), "modules.sensor.health.http", 7, 13,
     "on loopback"),
    (("[8080]", "[80800]"), "modules.filter.ports", 11, 12, "not a TCP port"),
    (("[10.0.0.2]", "[dns.example]"), "modules.filter.dns", 12, 10, "not an IP address"),
    (("/usr/bin/python3", "python3"), "modules.sensor.command", 3, 14, "absolute path"),
    (("package: {name: filt, version: 1.0.0}", "order: 2"), "modules.filter", 10, 5,
     "exactly one of 'package' and 'command'"),
    (("  filter:", "  Filter:"), "modules.Filter", 9, 3, "not a module name"),
    (("max_restarts: 3", "max_restarts: -1"), "modules.sensor.backoff.max_restarts", 5, 64,
     "greater than or equal to 0"),
])
def test_a_bad_field_names_its_line_and_column(change: tuple[str, str], field: str,
                                               line: int, column: int, words: str) -> None:
    error = refusal(GOOD.replace(*change))
    assert error.details["field"] == field, error.message
    assert (error.details["line"], error.details["column"]) == (line, column), error.message
    assert words in error.message
    assert f"line {line}, column {column}" in error.message


def test_every_problem_is_listed() -> None:
    error = refusal(GOOD.replace("on-failure", "sometimes").replace("[8080]", "[0]"))
    fields = [p["field"] for p in error.details["problems"]]
    assert "modules.sensor.restart_policy" in fields and "modules.filter.ports" in fields


def test_a_route_error_names_the_route_and_its_column() -> None:
    error = refusal(GOOD.replace("WHERE t > 3", "WHERE t >> 3"))
    assert error.details["field"] == "routes.hot"
    assert error.details["line"] == 15 and error.details["route_column"] == 50
    assert "expected a property or a value" in error.message
    missing = refusal(GOOD.replace("/modules/filter/inputs", "/modules/nobody/inputs"))
    assert "no module 'nobody' in this deployment" in missing.message
    source = refusal(GOOD.replace("/messages/modules/filter/*", "/messages/modules/ghost/*"))
    assert source.details["field"] == "routes.up" and "ghost" in source.message


def test_a_tab_in_the_indentation_is_named() -> None:
    error = refusal(GOOD.replace("  filter:", "\tfilter:"))
    assert (error.details["line"], error.details["column"]) == (9, 1)
    assert "indented with spaces" in error.message


def test_not_yaml_not_a_mapping_and_too_large() -> None:
    assert "not YAML or JSON" in refusal("modules: [").message
    assert "not YAML or JSON" in refusal('{"modules": ').message
    assert "a mapping" in refusal("- a\n- b\n").message
    assert "larger than" in refusal("#" * (1024 * 1024 + 1)).message


def test_env_names_reserved_for_the_agent_are_refused() -> None:
    error = refusal(GOOD.replace("    restart_policy: on-failure",
                                 "    env: {OUTPOST_MODULE_NAME: other}\n"
                                 "    restart_policy: on-failure"))
    assert "the agent's" in error.message


def test_the_schema_describes_the_manifest() -> None:
    schema = manifest_schema()
    assert schema["title"] == "Outpost deployment manifest"
    assert {"modules", "routes", "message_hub"} <= set(schema["properties"])
    assert "restart_policy" in schema["$defs"]["ModuleSpec"]["properties"]


def test_a_module_package_is_read_with_its_own_manifest(tmp_path: object) -> None:
    import io
    import tarfile

    def archive(files: dict[str, tuple[bytes, int]]) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w:gz") as tar:
            for name, (data, mode) in files.items():
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), mode
                tar.addfile(info, io.BytesIO(data))
        return out.getvalue()

    manifest = json.dumps({"name": "filt", "version": "1.0.0",
                           "run": {"run": "bin/start", "args": ["-v"]}}).encode()
    good = archive({"outpost-module.json": (manifest, 0o644),
                    "bin/start": (b"#!/bin/sh\nexec sleep 60\n", 0o755)})
    package = extpackage.read(good, kind="module")
    assert package.manifest.run.args == ["-v"] and "bin/start" in package.executables
    not_exec = archive({"outpost-module.json": (manifest, 0o644),
                        "bin/start": (b"#!/bin/sh\n", 0o644)})
    with pytest.raises(OutpostError, match="module package is not valid.*not executable"):
        extpackage.read(not_exec, kind="module")
    with pytest.raises(OutpostError, match="outpost-module.json is missing"):
        extpackage.read(archive({"bin/start": (b"x", 0o755)}), kind="module")


def test_route_names_may_have_capitals_module_names_may_not() -> None:
    manifest, _ = load_manifest(GOOD.replace("  hot:", "  sensorToFilter:"))
    assert "sensorToFilter" in manifest.routes
    error = refusal(GOOD.replace("  hot:", "  hot route:"))
    assert error.details["field"] == "routes.hot route" and error.details["line"] == 15


def test_the_agent_checks_a_module_package_without_pydantic(tmp_path: Path) -> None:
    """The agent unpacks with light=True: the same packages taken, the same refused, and
    pydantic not imported (its memory budget)."""
    import subprocess
    import sys

    def archive(manifest: dict[str, object], mode: int = 0o755) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w:gz") as tar:
            for name, data, bits in (("outpost-module.json", json.dumps(manifest).encode(),
                                      0o644), ("bin/start", b"#!/bin/sh\nexec sleep 9\n", mode)):
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), bits
                tar.addfile(info, io.BytesIO(data))
        return out.getvalue()

    good = {"name": "filt", "version": "1.0.0", "run": {"run": "bin/start", "args": ["-v"]}}
    cases = [archive(good), archive(good, 0o644), archive({**good, "name": "Filt"}),
             archive({**good, "version": "one"}), archive({**good, "run": {"run": "/bin/sh"}}),
             archive({"name": "filt", "version": "1.0.0"})]
    for data in cases:
        heavy: object
        try:
            heavy = extpackage.read(data, kind="module").manifest.run.args
        except OutpostError as exc:
            heavy = exc.code
        try:
            light = extpackage.read(data, kind="module", light=True).manifest.run.args
        except OutpostError as exc:
            light = exc.code
        assert heavy == light, (heavy, light)
    (tmp_path / "pkg.tar.gz").write_bytes(cases[0])
    code = ("import sys; from pathlib import Path; from outpost.protocol import extpackage; "
            f"p = extpackage.unpack(Path({str(tmp_path / 'pkg.tar.gz')!r}).read_bytes(), "
            f"Path({str(tmp_path / 'out')!r}), None, 'module', True); "
            "print(p.manifest.name, 'pydantic' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.split() == ["filt", "False"], done.stdout + done.stderr
    assert (tmp_path / "out" / "bin" / "start").exists()
