"""A module process for the message hub's tests: it connects with ``ModuleClient`` (from
``OUTPOST_MODULE_SOCKET`` and ``OUTPOST_MODULE_NAME``) and takes one JSON command a line on
stdin, answering one JSON line on stdout:

    {"op": "send", "output": O, "body": TEXT, "properties": {...}}  -> {"ok": true} |
        {"filtered": true} (routes read O, no condition took it) | refusal
    {"op": "recv", "timeout": S}   -> the message ({"input", "body", "properties", ...})
    {"op": "method", "name": N, "sleep": S}  -> {"ok": true}; calls of N answer their
                                                payload after S seconds
    {"op": "flood", "output": O, "count": N, "pad": B} -> sends N numbered messages (each
                                                padded to B bytes), printing {"acked": i}
                                                after each, and {"error": ...} at a refusal
    {"op": "slow", "interval": S}  -> {"ok": true}; a thread takes one message every S seconds
    {"op": "callback"}             -> {"ok": true}; messages go to an on_message callback that
                                      notes them (as the slow thread does)
    {"op": "stats"}                -> {"taken": [bodies the slow thread took], "pending": n,
                                       "max_pending": the most its queue held, "window": w}
    {"op": "wait_pending", "count": N, "timeout": S} -> {"pending": n} once the client's
                                                queue holds N messages (or the timeout passed)

``OUTPOST_TEST_WINDOW`` asks the agent for that window in the hello.

``msgmodule.py tcp PORT`` takes the same commands over TCP connections to 127.0.0.1:PORT
(a module started by a real agent).

``msgmodule.py aio`` is a module on the asyncio client: it answers calls of ``echo``, sends
``aio`` on ``out``, prints {"ready": true} and the first message it receives, then serves
calls until stdin closes. ``msgmodule.py aiotake`` is a module on the asyncio client
(``OUTPOST_TEST_WINDOW`` too) that prints {"ready": true}, then for each line {"take": N}
on stdin takes N more messages from one ``messages()`` iterator and prints {"bodies":
[...], "pending": [the client's queue before each]}. ``msgmodule.py raw NAME`` instead
speaks the wire by hand: hello as NAME, then a send, and prints the frames it gets back.
``msgmodule.py server STATE SOCKET`` runs a message hub whose upstream never answers (for
the kill -9 test); it prints {"ready": true}.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import sys
import time
from pathlib import Path
from typing import Any


def _module(lines: Any = None, out: Any = None) -> None:
    from outpost.modules import IdentityRefused, ModuleClient, Refused

    lines = sys.stdin if lines is None else lines
    out = sys.stdout if out is None else out

    def print(text: str, flush: bool = True) -> None:  # noqa: A001 - one line to `out`
        out.write(text + "\n")
        out.flush()

    try:
        window = int(os.environ.get("OUTPOST_TEST_WINDOW", "0")) or None
        client = ModuleClient(backoff_cap=0.2, window=window)
    except IdentityRefused as exc:
        print(json.dumps({"refused": exc.status, "reason": exc.reason}), flush=True)
        return
    print(json.dumps({"ready": True}), flush=True)
    taken: list[str] = []
    most = [0]

    def slow(interval: float) -> None:
        while True:
            message = client.receive(0.01)
            if message is not None:
                taken.append(message.body.decode().strip())
                time.sleep(interval)
            most[0] = max(most[0], client.pending())

    for line in lines:
        asked: dict[str, Any] = json.loads(line)
        op = asked["op"]
        if op == "send":
            try:
                ack = client.send(asked["output"], asked.get("body", "").encode() * asked.get(
                    "repeat", 1), properties=asked.get("properties"))
                answer: dict[str, Any] = {"ok": True} if ack.routes else {"filtered": True}
            except Refused as exc:
                answer = {"status": exc.status, "reason": exc.reason}
        elif op == "recv":
            message = client.receive(asked.get("timeout", 5))
            answer = {"none": True} if message is None else {
                "input": message.input, "body": message.body.decode(),
                "properties": message.properties, "module": message.module,
                "output": message.output}
        elif op == "method":
            pause = float(asked.get("sleep", 0))

            def run(payload: Any, pause: float = pause) -> Any:
                time.sleep(pause)
                return {"echo": payload}

            client.method(asked["name"], run)
            answer = {"ok": True}
        elif op == "flood":
            for i in range(asked["count"]):
                try:
                    client.send(asked["output"], f"m{i}".ljust(asked.get("pad", 0)).encode(),
                                timeout=2)
                except Exception as exc:
                    print(json.dumps({"error": str(exc)}), flush=True)
                    break
                print(json.dumps({"acked": i}), flush=True)
            answer = {"done": True}
        elif op == "slow":
            threading.Thread(target=slow, args=(asked["interval"],), daemon=True).start()
            answer = {"ok": True}
        elif op == "callback":
            client.on_message(lambda message: taken.append(message.body.decode().strip()))
            answer = {"ok": True}
        elif op == "stats":
            answer = {"taken": list(taken), "pending": client.pending(),
                      "max_pending": max(most[0], client.pending()), "window": client.window}
        elif op == "wait_pending":
            deadline = time.monotonic() + asked.get("timeout", 5)
            while client.pending() < asked["count"] and time.monotonic() < deadline:
                time.sleep(0.01)
            answer = {"pending": client.pending()}
        else:
            answer = {"unknown": op}
        print(json.dumps(answer), flush=True)
    client.close()


def _tcp(port: int) -> None:
    """The same commands over a TCP connection on 127.0.0.1:PORT, for a module the agent
    started (its stdin is not the test's): one connection at a time, each with its own
    client, so a test may connect, drive and hang up."""
    listener = socket.create_server(("127.0.0.1", port))
    while True:
        conn, _ = listener.accept()
        with conn, conn.makefile("r") as lines, conn.makefile("w") as out:
            _module(lines, out)


def _raw(name: str, path: str) -> None:
    from outpost.protocol import modwire

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.sendall(modwire.encode({"op": "hello", "module": name})
                 + modwire.encode({"op": "send", "id": 1, "output": "temp",
                                   "properties": {"temperature": 99}}, b"x"))
    frames = []
    try:
        while True:
            header, _ = modwire.read_frame(sock)
            frames.append(header)
    except (EOFError, OSError):
        pass
    print(json.dumps(frames), flush=True)


def _aio() -> None:
    from outpost.modules.aio import AsyncModuleClient

    async def main() -> None:
        async with await AsyncModuleClient.connect(backoff_cap=0.2) as client:

            async def echo(payload: Any) -> Any:
                await asyncio.sleep(0)
                return {"echo": payload}

            client.method("echo", echo)
            await client.send("out", b"aio")
            print(json.dumps({"ready": True}), flush=True)
            async for message in client.messages():
                print(json.dumps({"input": message.input, "body": message.body.decode()}),
                      flush=True)
                break
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    asyncio.run(main())


def _aiotake() -> None:
    from outpost.modules.aio import AsyncModuleClient

    async def main() -> None:
        window = int(os.environ.get("OUTPOST_TEST_WINDOW", "0")) or None
        loop = asyncio.get_running_loop()
        async with await AsyncModuleClient.connect(backoff_cap=0.2, window=window) as client:
            print(json.dumps({"ready": True}), flush=True)
            messages = client.messages()
            while line := await loop.run_in_executor(None, sys.stdin.readline):
                bodies, pending = [], []
                for _ in range(int(json.loads(line)["take"])):
                    await asyncio.sleep(0.05)  # what the agent may write meanwhile
                    pending.append(client.pending())
                    bodies.append((await anext(messages)).body.decode())
                print(json.dumps({"bodies": bodies, "pending": pending}), flush=True)

    asyncio.run(main())


def _server(state: str, path: str) -> None:
    from outpost.agent.modules.msghub import MessageHub
    from outpost.protocol.modules import load_manifest

    manifest, routes = load_manifest(
        "modules:\n  sensor: {command: [/bin/true]}\n"
        "routes:\n  up: FROM /messages/* INTO $upstream\n")

    async def away(batch: Any) -> Any:
        raise ConnectionError("the hub is away")

    async def main() -> None:
        hub = MessageHub(lambda pid: "sensor", Path(state), path=Path(path))
        hub.configure(manifest, routes)
        hub.set_upstream(away, backoff_base=0.05, backoff_cap=0.1)
        await hub.start()
        print(json.dumps({"ready": True}), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "raw":
        _raw(sys.argv[2], sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "tcp":
        _tcp(int(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "aio":
        _aio()
    elif len(sys.argv) > 1 and sys.argv[1] == "aiotake":
        _aiotake()
    elif len(sys.argv) > 1 and sys.argv[1] == "server":
        _server(sys.argv[2], sys.argv[3])
    else:
        _module()
