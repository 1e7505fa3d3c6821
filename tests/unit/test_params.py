"""Runbook parameter declarations and the checks a job's values go through."""

from __future__ import annotations

import pytest

from outpost.protocol import params
from outpost.protocol.errors import OutpostError


def test_specs_declare_type_default_and_requirement() -> None:
    specs = params.parse_specs(["target", "count:int=3", "dry:bool=yes", "cfg:json={\"a\": 1}"])
    assert specs == [
        {"name": "target", "type": "string", "required": True, "default": None},
        {"name": "count", "type": "int", "required": False, "default": 3},
        {"name": "dry", "type": "bool", "required": False, "default": True},
        {"name": "cfg", "type": "json", "required": False, "default": {"a": 1}},
    ]


@pytest.mark.parametrize("spec, words", [
    ("1bad:int", "not a valid name"),
    ("x:float", "unknown type 'float'"),
    ("n:int=ten", "'ten' is not an integer"),
    ("b:bool=maybe", "not true or false"),
    ("j:json={", "not valid JSON"),
])
def test_bad_specs_are_refused_with_the_reason(spec: str, words: str) -> None:
    with pytest.raises(OutpostError) as caught:
        params.parse_spec(spec)
    assert caught.value.code == "E4002"
    assert words in caught.value.message and spec in caught.value.message


def test_a_parameter_declared_twice_is_refused() -> None:
    with pytest.raises(OutpostError, match="declared twice"):
        params.parse_specs(["a", "a:int=1"])


def test_values_are_converted_and_defaults_filled() -> None:
    specs = params.parse_specs(["target", "count:int=3", "dry:bool=false", "cfg:json=null"])
    assert params.check(specs, {"target": "web", "count": "7", "cfg": "[1, 2]"}) == {
        "target": "web", "count": 7, "dry": False, "cfg": [1, 2]}


@pytest.mark.parametrize("given, code, name", [
    ({}, "E4004", "target"),
    ({"target": "x", "count": "many"}, "E4003", "count"),
    ({"target": "x", "count": True}, "E4003", "count"),
    ({"target": "x", "other": "1"}, "E4003", "other"),
])
def test_a_bad_or_missing_value_names_the_parameter(given: dict[str, object], code: str,
                                                    name: str) -> None:
    specs = params.parse_specs(["target", "count:int=3"])
    with pytest.raises(OutpostError) as caught:
        params.check(specs, given)
    assert caught.value.code == code
    assert caught.value.details["parameter"] == name
    assert f"'{name}'" in caught.value.message


def test_assignments_split_on_the_first_equals_sign() -> None:
    assert params.split_assignments(["a=1", "b=x=y", "c="]) == {"a": "1", "b": "x=y", "c": ""}
    with pytest.raises(OutpostError, match="not NAME=VALUE"):
        params.split_assignments(["novalue"])


def test_a_parameter_given_twice_is_refused_naming_it() -> None:
    with pytest.raises(OutpostError) as caught:
        params.split_assignments(["x=1", "y=2", "x=2"])
    assert caught.value.code == "E8042" and caught.value.details["parameter"] == "x"
    assert "'x' is given twice" in caught.value.message
    # The same value twice is as unclear a command line.
    with pytest.raises(OutpostError):
        params.split_assignments(["x=1", "x=1"])
    assert params.split_assignments(["x=1", "xy=2", "z=a=b"]) == {"x": "1", "xy": "2",
                                                                  "z": "a=b"}


def test_did_you_mean() -> None:
    from outpost.protocol.names import did_you_mean, nearest

    assert did_you_mean("lcoal", ["local", "web", "db"]) == "did you mean 'local'?"
    assert nearest("WEB", ["local", "web"]) == "web"
    assert nearest("gret", ["greet", "deploy"]) == "greet"
    assert did_you_mean("zzzz", ["local", "web"]) == ""
    assert nearest("local", ["local"]) is None
