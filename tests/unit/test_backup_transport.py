"""How restic reaches the hub (outpost.backup.transport): restic's version read from what
``restic version`` prints, the choice of direct or bridge, and the arguments and
environment each gives restic (the token in the environment only)."""

from __future__ import annotations

import shlex

import pytest

from outpost.backup import transport

MACHINE = "0b6f1b8e-0f7a-4f43-9c39-6d7a0c3e2a11"
TOKEN = "obk_" + "t" * 43


@pytest.mark.parametrize(("printed", "version"), [
    ("restic 0.14.0 compiled with go1.19.8 on linux/amd64\n", (0, 14, 0)),
    ("restic 0.18.0 compiled with go1.24.4 on linux/amd64\n", (0, 18, 0)),
    ("restic 0.17.3-dev (compiled manually) compiled with go1.22.5 on linux/arm64", (0, 17, 3)),
    ("restic 1.0 compiled with go1.30 on linux/amd64", (1, 0, 0)),
    ("restic v0.16.4 compiled with go1.21.6 on darwin/arm64", (0, 16, 4)),
    ("something else 0.18.0", None),
    ("", None),
])
def test_the_version_restic_prints(printed: str, version: transport.Version | None) -> None:
    assert transport.parse_version(printed) == version


@pytest.mark.parametrize(("setting", "version", "chosen"), [
    (None, (0, 18, 0), "direct"),
    ("", (0, 17, 0), "direct"),
    ("auto", (0, 16, 4), "bridge"),
    ("auto", (0, 14, 0), "bridge"),
    ("AUTO", (1, 2, 0), "direct"),
    ("auto", None, "bridge"),  # a version restic did not say: taken as too old
    ("bridge", (0, 18, 0), "bridge"),
    ("bridge", (0, 14, 0), "bridge"),
    ("bridge", None, "bridge"),
    ("direct", (0, 17, 0), "direct"),
])
def test_the_choice_of_transport(setting: str | None, version: transport.Version | None,
                                 chosen: str) -> None:
    assert transport.choose(setting, version) == chosen


@pytest.mark.parametrize(("setting", "version", "said"), [
    ("direct", (0, 16, 4), "transport 'direct' needs restic 0.17.0 or later (this restic "
                           "is 0.16.4)"),
    ("direct", None, "(this restic is an unknown version)"),
    ("rest", (0, 18, 0), "transport must be one of auto, direct, bridge (got 'rest')"),
])
def test_a_transport_restic_cannot_take_is_refused(setting: str,
                                                   version: transport.Version | None,
                                                   said: str) -> None:
    with pytest.raises(transport.TransportError) as refused:
        transport.choose(setting, version)
    assert said in str(refused.value)


def test_direct_names_the_hub_and_carries_the_token_in_the_environment() -> None:
    opened = transport.connection("direct", "https://hub.example:8443/", MACHINE,
                                  "/tmp/ca.pem", TOKEN, ["python3", "-m", "bridge"])
    assert opened.args == ["-r", f"rest:https://hub.example:8443/v1/backup/{MACHINE}/",
                           "--cacert", "/tmp/ca.pem"]
    assert opened.env == {"RESTIC_REST_USERNAME": MACHINE, "RESTIC_REST_PASSWORD": TOKEN}


def test_the_bridge_is_restics_rclone_program_with_the_token_in_the_environment() -> None:
    opened = transport.connection("bridge", "https://hub.example:8443", MACHINE,
                                  "/tmp/my ca.pem", TOKEN, ["/opt/py thon", "-m", "bridge"])
    assert opened.args[:2] == ["-r", "rclone:outpost"]
    assert opened.args[3] == "rclone.program='/opt/py thon'"
    assert shlex.split(opened.args[5].removeprefix("rclone.args=")) == [
        "-m", "bridge", "--hub", "https://hub.example:8443", "--machine-id", MACHINE,
        "--ca-file", "/tmp/my ca.pem"]
    assert opened.env == {"OUTPOST_BACKUP_TOKEN": TOKEN}
    assert all(TOKEN not in arg for arg in opened.args)
    with pytest.raises(transport.TransportError):
        transport.connection("auto", "https://hub", MACHINE, "/ca", TOKEN, ["b"])
