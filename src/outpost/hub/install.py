"""The agent the hub hands out: its wheel, its install script, and the line that fetches both.

A new machine gets the agent with one line (``install_line``). The line fetches the hub's CA
certificate without trusting it, compares the SHA-256 of its DER with the fingerprint written
in the line, and only then downloads ``/v1/agent/install.sh`` over TLS verified against that
CA. The script installs the agent's wheel, which the hub also serves, into a venv of its own,
registers the machine and sets up its service (``agent_install.sh`` beside this module).

The wheel is built here from the running installation, with no build tool and no network: the
files of the ``outpost`` package as they are on disk (an editable install has them only
there) and the distribution's metadata from ``importlib.metadata``. Every entry has a fixed
date and mode and the entries are sorted, so the same installation always gives the same
bytes. The hub's own modules stay in: ``outpost up`` and ``outpost hub`` import them lazily,
so they cost the agent nothing, and a wheel without them would not be the package its
metadata names.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import shlex
import zipfile
from importlib import metadata
from pathlib import Path

from outpost.protocol.errors import OutpostError
from outpost.protocol.fingerprint import parse as parse_fingerprint

DIST_NAME = "outpost-fleet"
# The names under which the hub serves what it hands out.
SCRIPT_PATH = "/v1/agent/install.sh"
WHEEL_ALIAS = "/v1/agent/agent.whl"
# The variable the line and the script read the account key from: never a URL, never argv.
KEY_ENV = "OUTPOST_ACCOUNT_KEY"

_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip file can hold
_PACKAGE_SUFFIXES = (".py", ".sh", ".typed", ".mako")
_SKIPPED_METADATA = ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")


def wheel_name(version: str, dist: str = DIST_NAME, tag: str = "py3-none-any") -> str:
    return f"{_normal(dist)}-{version}-{tag}.whl"


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode()


def _zip(entries: dict[str, bytes], dist_info: str, executable: set[str]) -> bytes:
    """A wheel: the entries, then RECORD naming each with its hash."""
    record = [f"{name},{_record_hash(data)},{len(data)}" for name, data in entries.items()]
    record.append(f"{dist_info}/RECORD,,")
    entries = {**entries, f"{dist_info}/RECORD": ("\n".join(record) + "\n").encode()}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name, _DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (0o755 if name in executable else 0o644) << 16
            archive.writestr(info, data)
    return buffer.getvalue()


def _metadata_entries(dist: metadata.Distribution, dist_info: str,
                      tags: list[str]) -> dict[str, bytes]:
    entries: dict[str, bytes] = {}
    for name in ("METADATA", "entry_points.txt", "top_level.txt"):
        text = dist.read_text(name)
        if text is not None:
            entries[f"{dist_info}/{name}"] = text.encode()
    if f"{dist_info}/METADATA" not in entries:
        raise OutpostError("agent_wheel_unavailable",
                           f"The installed {dist.metadata['Name']} has no METADATA.")
    entries[f"{dist_info}/WHEEL"] = (
        "Wheel-Version: 1.0\nGenerator: outpost-hub\nRoot-Is-Purelib: "
        f"{'true' if tags[0].endswith('-none-any') else 'false'}\n"
        + "".join(f"Tag: {tag}\n" for tag in tags)).encode()
    return entries


def agent_wheel_name() -> str:
    """The file name of the agent's wheel (the version of the installed distribution)."""
    try:
        return wheel_name(metadata.version(DIST_NAME))
    except metadata.PackageNotFoundError:
        from outpost import __version__

        return wheel_name(__version__)


def agent_wheel() -> tuple[str, bytes]:
    """(file name, bytes) of the agent's wheel, built from the running installation."""
    import outpost

    try:
        dist = metadata.distribution(DIST_NAME)
    except metadata.PackageNotFoundError as exc:
        raise OutpostError("agent_wheel_unavailable",
                           f"The distribution {DIST_NAME} is not installed here; the hub "
                           "runs from a source tree.") from exc
    version = dist.version
    dist_info = f"{_normal(DIST_NAME)}-{version}.dist-info"
    root = Path(outpost.__file__).resolve().parent
    entries: dict[str, bytes] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root.parent)
        if ("__pycache__" in relative.parts or not path.is_file()
                or not path.name.endswith(_PACKAGE_SUFFIXES)):
            continue
        entries[relative.as_posix()] = path.read_bytes()
    if "outpost/cli/main.py" not in entries:
        raise OutpostError("agent_wheel_unavailable",
                           f"The package files under {root} are incomplete.")
    executable = {name for name in entries if name.endswith(".sh")}
    entries.update(_metadata_entries(dist, dist_info, ["py3-none-any"]))
    return wheel_name(version), _zip(entries, dist_info, executable)


def wheel_from_installed(dist: metadata.Distribution) -> tuple[str, bytes]:
    """(file name, bytes) of a wheel of any installed, non-editable distribution.

    Made from the files its RECORD lists, under the tags of its WHEEL file; scripts
    outside site-packages are left out (pip writes them again from entry_points.txt). This
    is how a wheelhouse is made from a venv without the network.
    """
    name = dist.metadata["Name"]
    wheel_text = dist.read_text("WHEEL") or ""
    tags = [line.split(":", 1)[1].strip() for line in wheel_text.splitlines()
            if line.startswith("Tag:")]
    if not tags or dist.files is None:
        raise OutpostError("agent_wheel_unavailable",
                           f"The installed {name} has no WHEEL tag or RECORD to rebuild it "
                           "from.")
    dist_info = f"{_normal(name)}-{dist.version}.dist-info"
    entries: dict[str, bytes] = {}
    executable: set[str] = set()
    for file in sorted(dist.files, key=str):
        posix = file.as_posix()
        if posix.startswith("..") or "__pycache__" in file.parts or posix.endswith(".pyc"):
            continue
        if file.parent.name.endswith(".dist-info"):
            continue
        located = Path(str(file.locate()))
        if located.is_file():
            entries[posix] = located.read_bytes()
            if os.access(located, os.X_OK):
                executable.add(posix)
    entries.update(_metadata_entries(dist, dist_info, tags))
    # The file name holds the tags compressed (py2.py3-none-any), as pip reads them.
    parts = [sorted({tag.split("-")[i] for tag in tags}) for i in range(3)]
    compressed = "-".join(".".join(part) for part in parts)
    return wheel_name(dist.version, name, compressed), _zip(entries, dist_info, executable)


def cached_wheel(directory: Path) -> Path:
    """The agent's wheel under ``directory``, written there once per version.

    Built afresh and compared with what is there, so a hub upgraded in place under the same
    version number still hands out what it runs.
    """
    name, data = agent_wheel()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    if not path.exists() or path.read_bytes() != data:
        partial = path.with_suffix(f".{os.getpid()}.part")
        partial.write_bytes(data)
        partial.replace(path)
    return path


def install_script(wheel: str) -> str:
    """The install script, naming the wheel this hub serves."""
    template = (Path(__file__).with_name("agent_install.sh")).read_text()
    return template.replace("@WHEEL@", wheel)


# The line's first part, run by sh: fetch the CA without trusting it, refuse unless its
# SHA-256 is the pinned one (sed, base64 and sha256sum: coreutils, no openssl needed), then
# fetch the script over TLS verified against that CA and run it. $0 and $1 (sh -c's first
# two arguments) are the hub URL and the fingerprint; the rest are the script's options.
_FETCH = (
    'h=$0 f=$1; shift; d=$(mktemp -d) || exit 1; '
    'curl -fsSk "$h/v1/ca" -o "$d/ca.pem" || '
    '{ echo "outpost: cannot reach $h" >&2; rm -rf "$d"; exit 1; }; '
    '[ "$(sed /-----/d "$d/ca.pem" | base64 -d | sha256sum | cut -c1-64)" = "$f" ] || '
    '{ echo "outpost: $h did not present the CA with fingerprint $f; nothing was '
    'installed" >&2; rm -rf "$d"; exit 1; }; '
    f'curl -fsS --cacert "$d/ca.pem" "$h{SCRIPT_PATH}" -o "$d/install.sh" || '
    f'{{ echo "outpost: cannot download $h{SCRIPT_PATH}" >&2; rm -rf "$d"; exit 1; }}; '
    'sh "$d/install.sh" --hub "$h" --ca-file "$d/ca.pem" --ca-fingerprint "$f" "$@"; '
    'r=$?; rm -rf "$d"; exit $r'
)


def install_line(url: str, fingerprint: str, account_id: str, group: str,
                 account_key: str | None = None, name: str | None = None,
                 extra: list[str] | None = None) -> str:
    """The one line an operator runs on a new machine to install and register its agent.

    With ``account_key``, the line sets it in ``OUTPOST_ACCOUNT_KEY`` for the script (so it
    is in no URL and in no process's arguments); without, the operator exports it first.
    ``extra`` holds more options of the script (``--wheelhouse DIR``, ``--no-service``...).
    """
    pinned = parse_fingerprint(fingerprint)
    args = [url.rstrip("/"), pinned, "--account-id", account_id, "--group", group]
    if name:
        args += ["--name", name]
    args += extra or []
    line = f"sh -c {shlex.quote(_FETCH)} " + " ".join(shlex.quote(a) for a in args)
    if account_key is not None:
        line = f"{KEY_ENV}={shlex.quote(account_key)} {line}"
    return line
