"""Backup and restore through the hub against plain restic to a local repository.

A tree of mixed files (``--megabytes`` in all, 1024 by default: a few files of tens of MB of
random bytes, many of a few KB to a few hundred KB, some of them compressible text, nested
directories) is backed up and restored by the real restic:

- ``hub``: through outpost-restic-bridge to a real hub process on 127.0.0.1 (HTTPS, the
  machine's backup token), the repository on the hub's disk;
- ``local``: ``restic -r DIR``, a repository on the same disk.

The two run alternately (hub, local, hub, local... ``--rounds`` times, each round a fresh
repository), so the machine's load hits both alike; the medians and the ratio hub/local of
backup and restore times are printed, with the target (within 20 %: ratio ≤ 1.20). Restored
trees are compared with the source (sizes and SHA-256 of every file) once per variant.

    .venv/bin/python bench/backup_store.py --megabytes 1024 --rounds 3

Not a test: it exits 0 even when the target is missed, and gives up after --max-seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._common import TimeBound, cancel_time_bound, time_bound  # noqa: E402
from tests.support import Hub, clean_env, init_hub, register  # noqa: E402

PASSWORD = "bench"


def make_tree(root: Path, megabytes: int, seed: int = 7) -> int:
    """Mixed files totalling about ``megabytes`` MiB; returns the number of files."""
    rng = random.Random(seed)
    target = megabytes * 1024 * 1024
    total = count = 0
    words = [rng.randbytes(6).hex() for _ in range(500)]
    while total < target:
        folder = root / f"d{rng.randrange(20):02d}" / f"e{rng.randrange(10)}"
        folder.mkdir(parents=True, exist_ok=True)
        roll = rng.random()
        if roll < 0.02:
            size = rng.randrange(20, 60) * 1024 * 1024  # large random
            data = os.urandom(min(size, target - total + 1))
        elif roll < 0.40:
            size = rng.randrange(1, 400) * 1024  # text: compressible
            line = " ".join(rng.choice(words) for _ in range(12)).encode() + b"\n"
            data = (line * (size // len(line) + 1))[:size]
        else:
            data = os.urandom(rng.randrange(1, 300) * 1024)
        (folder / f"f{count:06d}").write_bytes(data)
        total += len(data)
        count += 1
    return count


def digest_tree(root: Path) -> dict[str, str]:
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def run(args: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:6])}...: {done.returncode}\n{done.stderr[-2000:]}")
    return elapsed


class Variant:
    def __init__(self, name: str, repo_args: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.repo_args = repo_args
        self.env = env
        self.backup: list[float] = []
        self.restore: list[float] = []
        self.checked = False

    def round(self, source: Path, scratch: Path, fresh: Callable[[], None]) -> None:
        fresh()
        restic = ["restic", *self.repo_args, "--no-cache"]
        run([*restic, "init"], self.env)
        self.backup.append(run([*restic, "backup", "--quiet", str(source)], self.env))
        target = scratch / f"restore-{self.name}"
        shutil.rmtree(target, ignore_errors=True)
        self.restore.append(run([*restic, "restore", "latest", "--target", str(target)],
                                self.env))
        if not self.checked:
            restored = target / str(source).lstrip("/")
            assert digest_tree(restored) == digest_tree(source), f"{self.name}: other bytes"
            self.checked = True
        shutil.rmtree(target, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where the tree, the hub "
                        "and the repositories go (default: a new directory in /var/tmp)")
    parser.add_argument("--max-seconds", type=float, default=3600)
    args = parser.parse_args()
    if shutil.which("restic") is None:
        print("restic is not installed (apt-get install restic)")
        return 0
    root = Path(tempfile.mkdtemp(prefix="outpost-bench-backup-", dir=args.dir or "/var/tmp"))
    hub: Hub | None = None
    time_bound(args.max_seconds)
    try:
        source = root / "source"
        files = make_tree(source, args.megabytes)
        print(f"tree: {files} files, {args.megabytes} MiB; load average "
              f"{os.getloadavg()[0]:.2f}", flush=True)
        hub = init_hub(root / "hub", f"sqlite:///{root / 'hub.db'}").start()
        assert register(hub, root / "machine", "bench").returncode == 0
        issued = hub.api("POST", "/v1/machines/bench/backup-token", json={}).json()
        repo_dir = hub.data_dir / "backup" / hub.account_id / issued["machine_id"]
        bridge = Path(sys.executable).parent / "outpost-restic-bridge"
        through_hub = Variant("hub", [
            "-r", "rclone:outpost", "-o", f"rclone.program={bridge}", "-o",
            f"rclone.args=--hub {hub.url} --machine-id {issued['machine_id']} "
            f"--ca-file {hub.data_dir / 'ca.pem'}"],
            clean_env(RESTIC_PASSWORD=PASSWORD, OUTPOST_BACKUP_TOKEN=issued["token"]))
        local_dir = root / "local-repo"
        local = Variant("local", ["-r", str(local_dir)], clean_env(RESTIC_PASSWORD=PASSWORD))
        for number in range(args.rounds):
            for variant, where in ((through_hub, repo_dir), (local, local_dir)):
                variant.round(source, root, lambda where=where: shutil.rmtree(
                    where, ignore_errors=True))
                print(f"round {number + 1} {variant.name:5}: backup "
                      f"{variant.backup[-1]:6.2f} s, restore {variant.restore[-1]:6.2f} s",
                      flush=True)
        cancel_time_bound()
        print()
        print("| step | hub (median s) | local (median s) | hub/local | target |")
        print("| --- | --- | --- | --- | --- |")
        for step in ("backup", "restore"):
            a = statistics.median(getattr(through_hub, step))
            b = statistics.median(getattr(local, step))
            mib = args.megabytes / a
            print(f"| {step} | {a:.2f} ({mib:.0f} MiB/s) | {b:.2f} | {a / b:.2f} | "
                  f"≤ 1.20 {'met' if a / b <= 1.20 else 'MISSED'} |")
    except TimeBound as exc:
        print(f"gave up: {exc}")
    finally:
        cancel_time_bound()
        if hub is not None:
            hub.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
