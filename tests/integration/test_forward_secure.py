"""Forwarding upstream messages to a broker that asks for TLS and a password: a real
nats-server and a real Mosquitto started by the test on free ports, each with a
certificate from a test CA and a password; the hub's client (hub/messages.py, hub/mqtt.py)
against them, and a real hub process forwarding through them.

The password is in a file (``password_file``), read at each connection: a wrong one shows
in ``hub check`` with what to fix, the messages are kept, and correcting the file is enough
(no restart)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from outpost.hub import pki
from outpost.hub.config import MessageForward
from outpost.hub.messages import NatsError, NatsLink
from outpost.hub.mqtt import MqttError, MqttLink
from tests import mqtt_sub
from tests.integration.test_upstream_hub import batch, check, configure
from tests.nats_sub import Subscriber
from tests.support import Hub, free_port, machine_calls, stop_process, wait_until

PASSWORD = "s3cret-" + uuid.uuid4().hex[:8]


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, Path]:
    found = {"ca": tmp_path / "ca.pem", "ca_key": tmp_path / "ca.key",
             "cert": tmp_path / "broker.pem", "key": tmp_path / "broker.key",
             "other_ca": tmp_path / "other-ca.pem"}
    pki.create_ca("test broker CA", found["ca"], found["ca_key"])
    pki.create_server_cert(found["ca"], found["ca_key"], ["127.0.0.1"], found["cert"],
                           found["key"])
    pki.create_ca("another CA", found["other_ca"], tmp_path / "other-ca.key")
    return found


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


@pytest.fixture
def nats_tls(certs: dict[str, Path]) -> Iterator[int]:
    server = shutil.which("nats-server")
    if server is None:
        pytest.skip("nats-server is not installed (Debian package nats-server)")
    port = free_port()
    proc = subprocess.Popen(
        [server, "-a", "127.0.0.1", "-p", str(port), "--user", "hub", "--pass", PASSWORD,
         "--tls", "--tlscert", str(certs["cert"]), "--tlskey", str(certs["key"])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _listening(port), 10, 0.05, "nats-server to listen")
        yield port
    finally:
        stop_process(proc)


@pytest.fixture
def mosquitto_tls(certs: dict[str, Path], tmp_path: Path) -> Iterator[tuple[int, int]]:
    """(TLS + password port, plain anonymous port for the test's subscriber)."""
    broker, passwd = shutil.which("mosquitto"), shutil.which("mosquitto_passwd")
    if broker is None or passwd is None:
        pytest.skip("mosquitto is not installed (Debian package mosquitto)")
    secure, plain = free_port(), free_port()
    passwords = tmp_path / "mosquitto.passwd"
    subprocess.run([passwd, "-b", "-c", str(passwords), "hub", PASSWORD], check=True,
                   capture_output=True)
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        "user root\nper_listener_settings true\n"
        f"listener {secure} 127.0.0.1\ncafile {certs['ca']}\ncertfile {certs['cert']}\n"
        f"keyfile {certs['key']}\nallow_anonymous false\npassword_file {passwords}\n"
        f"listener {plain} 127.0.0.1\nallow_anonymous true\n")
    proc = subprocess.Popen([broker, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _listening(secure) and _listening(plain), 10, 0.05,
                   "mosquitto to listen")
        yield secure, plain
    finally:
        stop_process(proc)


def _forward(tmp_path: Path, password: str, **fields: object) -> MessageForward:
    secret = tmp_path / f"password-{uuid.uuid4().hex[:6]}"
    secret.write_text(password + "\n")
    return MessageForward.model_validate({"password_file": secret, **fields})


def test_the_nats_client_speaks_tls_and_credentials(
        nats_tls: int, certs: dict[str, Path], tmp_path: Path) -> None:
    url = f"tls://127.0.0.1:{nats_tls}"

    async def connect(settings: MessageForward) -> None:
        link = await NatsLink.connect(str(settings.nats), access=settings)
        try:
            await link.publish("outpost.test", [("a", "b")], b"x")
            await link.confirm()
        finally:
            await link.close()

    good = _forward(tmp_path, PASSWORD, nats=url, username="hub", ca_file=certs["ca"])
    asyncio.run(connect(good))
    # nats:// also starts TLS when the server requires it.
    asyncio.run(connect(good.model_copy(update={"nats": f"nats://127.0.0.1:{nats_tls}"})))
    with pytest.raises(NatsError, match="Authorization Violation.*password_file"):
        asyncio.run(connect(_forward(tmp_path, "wrong", nats=url, username="hub",
                                     ca_file=certs["ca"])))
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(connect(_forward(tmp_path, PASSWORD, nats=url, username="hub",
                                     ca_file=certs["other_ca"])))
    with pytest.raises(ssl.SSLCertVerificationError):  # the name is checked too
        asyncio.run(connect(_forward(tmp_path, PASSWORD, nats=url, username="hub",
                                     ca_file=certs["ca"], server_name="elsewhere.test")))
    # tls:// to the machine's plain NATS server (127.0.0.1:4222): refused, saying why.
    with pytest.raises(NatsError, match="offers no TLS"):
        asyncio.run(connect(_forward(tmp_path, PASSWORD, nats="tls://127.0.0.1:4222",
                                     username="hub")))


def test_the_mqtt_client_speaks_tls_and_credentials(
        mosquitto_tls: tuple[int, int], certs: dict[str, Path], tmp_path: Path) -> None:
    url = f"mqtts://127.0.0.1:{mosquitto_tls[0]}"

    async def connect(settings: MessageForward) -> None:
        link = await MqttLink.connect(settings.url, "t/{machine}", access=settings)
        try:
            await link.publish("outpost/test", [("a", "b")], b"x")
            await link.confirm()
        finally:
            await link.close()

    asyncio.run(connect(_forward(tmp_path, PASSWORD, mqtt=url, username="hub",
                                 ca_file=certs["ca"])))
    # Mosquitto answers a wrong password with 0x87 (not authorized) rather than 0x86.
    with pytest.raises(MqttError, match="reason 0x8[67].*password.*password_file"):
        asyncio.run(connect(_forward(tmp_path, "wrong", mqtt=url, username="hub",
                                     ca_file=certs["ca"])))
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(connect(_forward(tmp_path, PASSWORD, mqtt=url, username="hub",
                                     ca_file=certs["other_ca"])))


def test_settings_keep_credentials_out_of_the_url(certs: dict[str, Path],
                                                   tmp_path: Path) -> None:
    from pydantic import ValidationError
    secret = tmp_path / "pw"
    secret.write_text("x")
    for bad, said in (
            ({"nats": "nats://hub:pw@127.0.0.1:4222"}, "should match pattern"),
            ({"mqtt": "mqtts://h:8883", "username": "hub"}, "needs 'password_file'"),
            ({"mqtt": "mqtts://h:8883", "password_file": str(tmp_path / "nope")},
             "is not a file"),
            ({"mqtt": "mqtt://h:1883", "ca_file": str(certs["ca"])}, "are for TLS")):
        with pytest.raises(ValidationError, match=said):
            MessageForward.model_validate(bad)
    ok = MessageForward.model_validate({"mqtt": "mqtts://h:8883", "username": "u",
                                        "password_file": str(secret)})
    assert ok.tls and ok.password() == "x" and "x" not in ok.url


def test_a_hub_forwards_through_tls_and_a_password_file_it_reads_again(
        new_hub: Hub, mosquitto_tls: tuple[int, int], nats_tls: int,
        certs: dict[str, Path], tmp_path: Path) -> None:
    """A real hub process to Mosquitto over TLS with a wrong password first: the check
    names the refusal and what to fix, the messages are kept; the file corrected, they are
    all forwarded, with no restart. Then the same hub, restarted, to NATS over TLS."""
    secure, plain = mosquitto_tls
    topic = f"t{uuid.uuid4().hex[:10]}"
    secret = tmp_path / "broker-password"
    wrong = "not-it-" + uuid.uuid4().hex[:8]
    secret.write_text(wrong + "\n")
    configure(new_hub, {"mqtt": f"mqtts://127.0.0.1:{secure}", "username": "hub",
                        "password_file": str(secret), "ca_file": str(certs["ca"]),
                        "topic": topic + "/{machine}/{module}/{output}"})
    hub = new_hub.start()
    sub = mqtt_sub.Subscriber(f"{topic}/#", ("127.0.0.1", plain))
    try:
        call = machine_calls(hub, tmp_path / "m1", "edge1")
        assert call("POST", "/v1/agent/messages", batch(range(0, 20))) == {
            "accepted_through": 19}
        failing = wait_until(lambda: (c := check(hub))["result"] in ("warning", "error")
                             and c, 20, 0.3, "hub check to see the refusal")
        assert "password_file" in str(failing) and "reason 0x8" in str(failing), failing
        assert wrong not in str(failing) + hub.log() and PASSWORD not in hub.log(), failing
        assert sub.messages == []
        secret.write_text(PASSWORD + "\n")
        wait_until(lambda: len(sub.messages) >= 20, 30, 0.1, "20 messages on MQTT over TLS")
        assert [int(m.properties["Outpost-Seq"]) for m in sub.messages][:20] == \
            list(range(20))
        wait_until(lambda: check(hub)["result"] == "ok", 10, 0.3, "hub check ok")
    finally:
        sub.close()
        hub.stop()

    subject = f"s{uuid.uuid4().hex[:10]}"
    configure(hub, {"nats": f"tls://127.0.0.1:{nats_tls}", "username": "hub",
                    "password_file": str(secret), "ca_file": str(certs["ca"]),
                    "subject": subject + ".{machine}.{module}.{output}"})
    context = ssl.create_default_context(cafile=str(certs["ca"]))
    hub.start()
    nsub = Subscriber(f"{subject}.>", ("127.0.0.1", nats_tls), tls=context, user="hub",
                      password=PASSWORD)
    try:
        assert call("POST", "/v1/agent/messages", batch(range(20, 30))) == {
            "accepted_through": 29}
        # A new target's cursor: the 20 messages before may come too; the new ones do, in
        # order.
        def new() -> list[int]:
            return [s for m in nsub.messages if (s := int(m.headers["Outpost-Seq"])) >= 20]

        wait_until(lambda: len(new()) >= 10, 30, 0.1, "10 messages on NATS over TLS")
        assert new() == list(range(20, 30))
        wait_until(lambda: check(hub)["result"] == "ok", 10, 0.3, "hub check ok")
    finally:
        nsub.close()
