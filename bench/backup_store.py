"""Backup and restore through the hub against plain restic to a local repository.

A tree of mixed files (``--megabytes`` in all, 1024 by default: a few files of tens of MB of
random bytes, many of a few KB to a few hundred KB, some of them compressible text, nested
directories) is backed up and restored by the real restic:

- ``direct``: restic's own REST backend to a real hub process on 127.0.0.1 (HTTPS, the
  machine's backup token as HTTP Basic's password; restic 0.17 or later);
- ``bridge``: through outpost-restic-bridge to the same hub, the repository on the hub's
  disk;
- ``local``: ``restic -r DIR``, a repository on the same disk.

``--transport`` picks the hub's variants (``both`` by default with restic 0.17 or later,
``bridge`` otherwise). They run alternately (direct, bridge, local, then bridge, local,
direct... ``--rounds`` times, each round a fresh repository and starting one variant later,
so that over as many rounds as variants each runs first, second... once), so the machine's
load hits all alike; the medians
and the ratio to local of backup and restore times are printed for each, with the target
(within 20 %: ratio ≤ 1.20), and the CPU time of each step's processes: restic, the bridge
(0 when direct) and the hub (on a busy machine the wall-time ratio swings from run to run;
the CPU time does not), and the requests the hub answered. Restored trees are compared with
the source (sizes and SHA-256 of every file) once per variant.

restic's local cache is the same for every variant: by default one cache directory for all
of a round's commands of a variant (``--cache kept``), as the backup extension runs restic
(its cache is in the extension's data directory, which the agent keeps), new for each round
as the repository is; ``--cache cold`` gives each command a new one (as an agent without a
data directory for its extensions runs it), ``--cache none`` gives every command
``--no-cache``.
Without a cache restic fetches each directory's tree with a request of its own, one after
another (about 500 requests to restore 1 GiB of this tree, against 70 with a cache).
``--connections N`` sets restic's connections to the hub (``-o rest.connections=N``).
``--compare-loop`` adds a variant ``uvloop``: restic directly to a second hub process on the
same store and database, run on uvloop (``--event-loop uvloop``) where the first runs on
asyncio's own loop, in turn with the others; ``--compare SRC`` the same with a second
hub that runs another build's ``src`` directory (variant ``other``).

    .venv/bin/python bench/backup_store.py --megabytes 1024 --rounds 3 [--transport both]

``--profile DIR`` writes cProfile files, timed by CPU time, of the hub (``hub.prof``, its
main thread) and of every bridge process restic starts (``bridge-PID.prof``): ``python -m
pstats FILE``.

Not a test: it exits 0 even when the target is missed, and gives up after --max-seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._common import TimeBound, cancel_time_bound, time_bound  # noqa: E402
from outpost.backup import transport  # noqa: E402
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


def _cpu(process: psutil.Process | None) -> float:
    if process is None:
        return 0.0
    times = process.cpu_times()
    return times.user + times.system


# --cores split: the CPUs restic (and the bridge) may use, and those the hub may use.
RESTIC_CPUS: set[int] | None = None


def _restic_cores() -> None:
    if RESTIC_CPUS is not None:
        os.sched_setaffinity(0, RESTIC_CPUS)


def pin(process: psutil.Process, cpus: set[int]) -> None:
    """Every thread of ``process`` on ``cpus`` (threads it starts later inherit it)."""
    for thread in process.threads():
        os.sched_setaffinity(thread.id, cpus)


def run(args: list[str], env: dict[str, str], server: psutil.Process | None = None
        ) -> tuple[float, float, float, float]:
    """Seconds of wall time, and of CPU of: the command (restic), its children (the bridge),
    and ``server`` (the hub) meanwhile. The command and its children are sampled every 20 ms
    (their last few ms are missed): restic need not wait for the bridge, so the bridge's
    time may never reach the rusage of restic's exit."""
    server_before = _cpu(server)
    children: dict[int, float] = {}
    own = 0.0
    started = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                preexec_fn=_restic_cores)
        command = psutil.Process(proc.pid)
        while True:
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
            if pid:
                break
            with contextlib.suppress(psutil.Error):
                own = _cpu(command)
                for child in command.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        children[child.pid] = _cpu(child)
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(args[:6])}...: {proc.returncode}\n"
                               f"{err.read()[-2000:].decode(errors='replace')}")
    return elapsed, own, sum(children.values()), _cpu(server) - server_before


class Variant:
    def __init__(self, name: str, repo_args: list[str], env: dict[str, str],
                 server: psutil.Process | None = None) -> None:
        self.name = name
        self.repo_args = repo_args
        self.env = env
        self.server = server
        self.backup: list[float] = []
        self.restore: list[float] = []
        # CPU seconds of each step: (restic, the bridge, the hub)
        self.cpu: dict[str, list[tuple[float, float, float]]] = {"backup": [], "restore": []}
        self.count: dict[str, list[int]] = {"backup": [], "restore": []}
        self.answered: Callable[[], int] | None = None
        self.checked = False

    def step(self, name: str, args: list[str]) -> None:
        before = self.requests()
        elapsed, restic, bridge, server = run(args, self.env, self.server)
        getattr(self, name).append(elapsed)
        self.cpu[name].append((restic, bridge, server))
        # Less the request that read the count before.
        self.count[name].append(max(self.requests() - before - 1, 0))

    def requests(self) -> int:
        """The requests the hub has answered (0 without a hub)."""
        return self.answered() if self.answered is not None else 0

    def round(self, source: Path, scratch: Path, fresh: Callable[[], None],
              cache: str) -> None:
        fresh()
        restic = ["restic", *self.repo_args]
        cache_dir = scratch / "restic-cache"

        shutil.rmtree(cache_dir, ignore_errors=True)  # a new repository: a new cache

        def cached() -> list[str]:
            # As the backup extension runs restic: one cache directory kept between commands
            # (cold), or none at all.
            if cache == "none":
                return ["--no-cache"]
            if cache == "cold":
                shutil.rmtree(cache_dir, ignore_errors=True)
            return ["--cache-dir", str(cache_dir)]

        run([*restic, *cached(), "init"], self.env)
        self.step("backup", [*restic, *cached(), "backup", "--quiet", str(source)])
        target = scratch / f"restore-{self.name}"
        shutil.rmtree(target, ignore_errors=True)
        self.step("restore", [*restic, *cached(), "restore", "latest", "--target", str(target)])
        if not self.checked:
            restored = target / str(source).lstrip("/")
            assert digest_tree(restored) == digest_tree(source), f"{self.name}: other bytes"
            self.checked = True
        shutil.rmtree(target, ignore_errors=True)


def _cpu_text(variant: Variant, step: str) -> str:
    restic, bridge, hub = variant.cpu[step][-1]
    if variant.server is None:
        return f"CPU: restic {restic:.2f} s"
    return (f"CPU: restic {restic:.2f} s, bridge {bridge:.2f} s, hub {hub:.2f} s; "
            f"{variant.count[step][-1]} requests")


def _median_cpu(variant: Variant, step: str) -> str:
    found = variant.cpu[step]
    values = [statistics.median(c[i] for c in found) for i in range(3)]
    return ", ".join(f"{v:.2f}" for v in (values if variant.server else values[:1]))


def _answered(hub: Hub) -> int:
    """The requests the hub has answered so far, by its /metrics (which counts the request
    that read it once it is answered)."""
    text = hub.api("GET", "/metrics").text
    return round(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith("outpost_http_requests_total{")))


def profiled(where: Path, root: Path) -> Path:
    """A stand-in for outpost-restic-bridge that runs it under cProfile, timed by CPU (not
    wall) time, one file a run."""
    where.mkdir(parents=True, exist_ok=True)
    script = root / "bridge-profiled"
    script.write_text(
        f"#!{sys.executable}\n"
        "import cProfile, os, sys, time\n"
        "from outpost.backup.bridge import main\n"
        "profile = cProfile.Profile(time.process_time)\n"
        "try:\n"
        "    code = profile.runcall(main)\n"
        "finally:\n"
        f"    profile.dump_stats(f'{where}/bridge-{{os.getpid()}}.prof')\n"
        "sys.exit(code)\n")
    script.chmod(0o755)
    return script


def profiled_hub(where: Path, root: Path) -> dict[str, str]:
    """The environment of a hub that profiles its main thread by CPU time, written to
    ``hub.prof`` on SIGUSR1 (the hub's server re-raises SIGTERM, so atexit never runs)."""
    where.mkdir(parents=True, exist_ok=True)
    hook = root / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(
        "import cProfile, signal, time\n"
        "profile = cProfile.Profile(time.process_time)\n"
        "def dump(*_):\n"
        "    profile.disable()\n"
        f"    profile.dump_stats('{where}/hub.prof')\n"
        "    profile.enable()\n"
        "signal.signal(signal.SIGUSR1, dump)\n"
        "profile.enable()\n")
    return {"PYTHONPATH": str(hook)}


@contextlib.contextmanager
def hook_env(env: dict[str, str]) -> Iterator[None]:
    """``env`` in this process's environment while a hub starts (it inherits it)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where the tree, the hub "
                        "and the repositories go (default: a new directory in /var/tmp)")
    parser.add_argument("--max-seconds", type=float, default=3600)
    parser.add_argument("--profile", type=Path, default=None, help="a directory for "
                        "cProfile files of the hub and of each bridge process")
    parser.add_argument("--cache", choices=("kept", "cold", "none"), default="kept",
                        help="restic's local cache, alike for every variant: one kept between "
                        "a round's commands, as the backup extension runs restic (kept, the "
                        "default), a new cache directory for each restic command (cold), "
                        "or --no-cache (none)")
    parser.add_argument("--connections", type=int, default=None, help="restic's "
                        "connections to the hub (-o rest.connections=N; restic's default 5)")
    parser.add_argument("--compare-loop", action="store_true", help="also restic directly "
                        "to a second hub process on the same store, on uvloop "
                        "(--event-loop uvloop), in turn with the others")
    parser.add_argument("--compare", type=Path, default=None, metavar="SRC", help="also "
                        "restic directly to a second hub process on the same store running "
                        "another build's src directory (PYTHONPATH), in turn with the others")
    parser.add_argument("--cores", choices=("shared", "split"), default="shared",
                        help="shared (the default): every process may use every CPU; split: "
                        "restic (every variant's) on the first half of the CPUs, the hub on "
                        "the rest, as when the hub runs on a host of its own and restic "
                        "alone on the machine")
    parser.add_argument("--transport", choices=("direct", "bridge", "both"), default=None,
                        help="how restic reaches the hub: directly (restic 0.17 or later), "
                        "through the bridge, or both in turn (the default with restic 0.17 "
                        "or later; bridge otherwise)")
    args = parser.parse_args()
    found = shutil.which("restic")
    if found is None:
        print("restic is not installed (apt-get install restic)")
        return 0
    version = transport.restic_version(found)
    direct_ok = version is not None and version >= transport.DIRECT_SINCE
    if args.transport is None:
        args.transport = "both" if direct_ok else "bridge"
    if args.transport in ("direct", "both") and not direct_ok:
        print(f"restic {transport.shown(version)} cannot reach the hub directly (0.17 or "
              "later); use --transport bridge")
        return 2
    cpus = sorted(os.sched_getaffinity(0))
    hub_cpus: set[int] | None = None
    if args.cores == "split":
        if len(cpus) < 2:
            print("--cores split needs at least 2 CPUs")
            return 2
        global RESTIC_CPUS
        RESTIC_CPUS = set(cpus[:len(cpus) // 2])
        hub_cpus = set(cpus[len(cpus) // 2:])
    root = Path(tempfile.mkdtemp(prefix="outpost-bench-backup-", dir=args.dir or "/var/tmp"))
    hub: Hub | None = None
    other: Hub | None = None
    time_bound(args.max_seconds)
    try:
        source = root / "source"
        files = make_tree(source, args.megabytes)
        split = (f"; restic on CPUs {sorted(RESTIC_CPUS or ())}, the hub on "
                 f"{sorted(hub_cpus)}" if hub_cpus else "")
        print(f"tree: {files} files, {args.megabytes} MiB; restic's cache: {args.cache}; "
              f"load average {os.getloadavg()[0]:.2f}{split}", flush=True)
        hub = init_hub(root / "hub", f"sqlite:///{root / 'hub.db'}")
        bridge = Path(sys.executable).parent / "outpost-restic-bridge"
        if args.profile is not None:
            bridge = profiled(args.profile.resolve(), root)
        with hook_env(profiled_hub(args.profile.resolve(), root)
                      if args.profile is not None else {}):
            hub.start()
        assert register(hub, root / "machine", "bench").returncode == 0
        issued = hub.api("POST", "/v1/machines/bench/backup-token", json={}).json()
        repo_dir = hub.data_dir / "backup" / hub.account_id / issued["machine_id"]
        ca = str(hub.data_dir / "ca.pem")
        server = psutil.Process(hub.proc.pid) if hub.proc is not None else None
        chosen = ["direct", "bridge"] if args.transport == "both" else [args.transport]
        through_hub: list[Variant] = []
        for how in chosen:
            opened = transport.connection(how, hub.url, issued["machine_id"], ca,
                                          issued["token"], [str(bridge)])
            options = opened.args
            if args.connections is not None:
                kind = "rest" if how == "direct" else "rclone"
                options = [*options, "-o", f"{kind}.connections={args.connections}"]
            variant = Variant(how, options, clean_env(RESTIC_PASSWORD=PASSWORD, **opened.env),
                              server)
            variant.answered = lambda: _answered(hub)
            through_hub.append(variant)
        if args.compare_loop or args.compare is not None:
            other = hub.replica()
            if args.compare_loop:
                other.extra_args.extend(["--event-loop", "uvloop"])
            with hook_env({"PYTHONPATH": str(args.compare.resolve())}
                          if args.compare is not None else {}):
                other.start()
            opened = transport.connection("direct", other.url, issued["machine_id"], ca,
                                          issued["token"], [str(bridge)])
            variant = Variant("uvloop" if args.compare_loop else "other", opened.args,
                              clean_env(RESTIC_PASSWORD=PASSWORD, **opened.env),
                              psutil.Process(other.proc.pid) if other.proc else None)
            variant.answered = lambda: _answered(other)
            through_hub.append(variant)
        if hub_cpus is not None:
            for process in (server, psutil.Process(other.proc.pid) if other and other.proc
                            else None):
                if process is not None:
                    pin(process, hub_cpus)
        local_dir = root / "local-repo"
        local = Variant("local", ["-r", str(local_dir)], clean_env(RESTIC_PASSWORD=PASSWORD))
        order = [*((v, repo_dir) for v in through_hub), (local, local_dir)]
        for number in range(args.rounds):
            # Each round starts one variant later: a step runs a little slower or faster for
            # the step before it (the disk's writeback of what that one wrote), so over as
            # many rounds as variants each has each place once.
            shift = number % len(order)
            for variant, where in order[shift:] + order[:shift]:
                variant.round(source, root, lambda where=where: shutil.rmtree(
                    where, ignore_errors=True), args.cache)
                print(f"round {number + 1} {variant.name:6}: backup "
                      f"{variant.backup[-1]:6.2f} s ({_cpu_text(variant, 'backup')}), "
                      f"restore {variant.restore[-1]:6.2f} s "
                      f"({_cpu_text(variant, 'restore')})", flush=True)
        cancel_time_bound()
        print()
        print("| step | transport | hub (median s) | local (median s) | hub/local | target | "
              "CPU s: restic, bridge, hub / restic | requests |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for step in ("backup", "restore"):
            b = statistics.median(getattr(local, step))
            for variant in through_hub:
                a = statistics.median(getattr(variant, step))
                mib = args.megabytes / a
                print(f"| {step} | {variant.name} | {a:.2f} ({mib:.0f} MiB/s) | {b:.2f} | "
                      f"{a / b:.2f} | ≤ 1.20 {'met' if a / b <= 1.20 else 'MISSED'} | "
                      f"{_median_cpu(variant, step)} / {_median_cpu(local, step)} | "
                      f"{statistics.median(variant.count[step]):.0f} |")
    except TimeBound as exc:
        print(f"gave up: {exc}")
    finally:
        cancel_time_bound()
        if hub is not None:
            if args.profile is not None and hub.proc is not None:
                hub.proc.send_signal(signal.SIGUSR1)  # the hook writes hub.prof
                time.sleep(1)
            hub.stop()
        if other is not None:
            other.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
