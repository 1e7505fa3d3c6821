"""Benchmark-only instrumentation, loaded by the hub and agent processes a benchmark starts.

bench/_common.py puts this directory on PYTHONPATH (with BENCH_ROLE=hub or agent) only when
a benchmark is asked to trace or to try an alternative; src/ is never changed. Settings:

- BENCH_TRACE=FILE: append "event key unix-time" lines at points of the dispatch path.
- BENCH_UVLOOP=1: run asyncio.run() on uvloop (an experiment for the suggested change).
- BENCH_NODELAY=1: set TCP_NODELAY on accepted connections too (asyncio skips it for a
  listening socket made with proto 0, as outpost.protocol.ports.bind makes it).
- BENCH_CPROFILE=FILE: cProfile the main thread, written at exit and on SIGUSR1.
- BENCH_SNIFFIO=1: provide a stand-in 'sniffio' module (asyncio only). httpcore imports
  sniffio on every lock and cancellation shield; when it is not installed each of those is
  a failed import that searches sys.path.
- BENCH_SQLTIME=FILE: count the hub's SQL statements and their time, written every 2 s.
- BENCH_SQLITE_POOL=N: give the hub's SQLite engine a pool of N connections (no overflow);
  1 means one connection, so writers never wait on SQLite's busy handler.
- BENCH_STALLS=FILE: catch the event loop's stalls in the act. A watcher thread samples the
  main thread's stack every 10 ms while one turn of the loop (from a select() returning to
  the next) has run 20 ms or more; each turn of 50 ms or more is appended to FILE with its
  length, the descriptors that select() returned and the stacks seen.
"""

from __future__ import annotations

import os

_ROLE = os.environ.get("BENCH_ROLE", "")

if _ROLE:
    import atexit
    import importlib.abc
    import sys
    import time
    from typing import Any

    _trace_path = os.environ.get("BENCH_TRACE")
    _trace = open(_trace_path, "a", buffering=1) if _trace_path else None  # noqa: SIM115

    def mark(event: str, key: str = "-") -> None:
        if _trace is not None:
            _trace.write(f"{event} {key} {time.time():.6f}\n")

    if os.environ.get("BENCH_UVLOOP"):
        import asyncio

        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    if os.environ.get("BENCH_SNIFFIO"):
        import types

        _sniffio = types.ModuleType("sniffio")
        _sniffio.current_async_library = lambda: "asyncio"  # type: ignore[attr-defined]
        sys.modules.setdefault("sniffio", _sniffio)

    if os.environ.get("BENCH_NODELAY"):
        import asyncio.base_events
        import socket

        def _nodelay(sock: socket.socket) -> None:
            if sock.family in (socket.AF_INET, socket.AF_INET6) and \
                    sock.type == socket.SOCK_STREAM:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        asyncio.base_events._set_nodelay = _nodelay  # type: ignore[attr-defined]

    if os.environ.get("BENCH_CPROFILE"):
        import cProfile

        _prof = cProfile.Profile()
        _prof.enable()

        def _dump() -> None:
            _prof.disable()
            _prof.dump_stats(os.environ["BENCH_CPROFILE"])

        atexit.register(_dump)

        def _dump_now(*_: Any) -> None:
            # The hub's server re-raises SIGTERM after its shutdown, so atexit never runs
            # there: SIGUSR1 writes the profile so far (signal handlers run in the main
            # thread, the one profiled).
            _prof.disable()
            _prof.dump_stats(os.environ["BENCH_CPROFILE"])
            _prof.enable()

        import signal

        signal.signal(signal.SIGUSR1, _dump_now)

    def _ids(items: Any) -> str:
        try:
            return ",".join(str(i.get("id")) for i in items) or "-"
        except Exception:  # the shape of a return value is not ours to police
            return "?"

    def _patch_hub_jobs(mod: Any) -> None:
        start, claim = mod.start, mod.claim

        async def traced_start(*a: Any, **kw: Any) -> Any:
            mark("hub.start.begin")
            job = await start(*a, **kw)
            mark("hub.start.end", job["id"])
            return job

        async def traced_claim(*a: Any, **kw: Any) -> Any:
            mark("hub.jclaim.begin")
            items = await claim(*a, **kw)
            mark("hub.jclaim.end", _ids(items))
            return items

        mod.start, mod.claim = traced_start, traced_claim

    def _patch_dispatcher(mod: Any) -> None:
        cls = mod.Dispatcher
        dclaim, poll = cls.claim, cls.poll
        # Wake-ups go through the hub's notifier, inside the transaction that queued the job.
        notifier = mod.notify.Notifier
        wake = notifier.deliver_wake

        def traced_wake(self: Any, key: str) -> None:
            mark("hub.wake")
            wake(self, key)

        async def traced_dclaim(self: Any, *a: Any, **kw: Any) -> Any:
            mark("hub.claim.begin")
            items = await dclaim(self, *a, **kw)
            mark("hub.claim.end", _ids(items))
            return items

        async def traced_poll(self: Any, *a: Any, **kw: Any) -> Any:
            items = await poll(self, *a, **kw)
            mark("hub.poll.return", _ids(items))
            return items

        notifier.deliver_wake = traced_wake
        cls.claim, cls.poll = traced_dclaim, traced_poll

    def _patch_transport(mod: Any) -> None:
        request = mod.HubClient.request

        async def traced_request(self: Any, method: str, path: str, *a: Any, **kw: Any) -> Any:
            what = path.split("?")[0].rsplit("/", 1)[-1]
            mark(f"agent.req.{what}.begin")
            answer = await request(self, method, path, *a, **kw)
            items = answer.get("items") if isinstance(answer, dict) else None
            mark(f"agent.req.{what}.end", _ids(items) if items is not None else "-")
            return answer

        mod.HubClient.request = traced_request

    def _patch_runner(mod: Any) -> None:
        import asyncio

        run = mod.JobRun.run
        spawn = asyncio.create_subprocess_exec

        async def traced_run(self: Any) -> Any:
            mark("agent.run.begin", self.id)
            try:
                return await run(self)
            finally:
                mark("agent.run.end", self.id)

        async def traced_spawn(*a: Any, **kw: Any) -> Any:
            key = (kw.get("env") or {}).get("OUTPOST_JOB_ID", "-")
            mark("agent.spawn.begin", key)
            proc = await spawn(*a, **kw)
            mark("agent.spawn.end", key)
            return proc

        mod.JobRun.run = traced_run
        mod.asyncio = _AsyncioProxy(asyncio, traced_spawn)

        # Where pidfds work the runner starts runbooks with process.spawn (synchronous).
        real_spawn = mod.process.spawn

        def traced_pspawn(argv: Any, cwd: Any, env: Any, identity: Any) -> Any:
            key = (env or {}).get("OUTPOST_JOB_ID", "-")
            mark("agent.spawn.begin", key)
            started = real_spawn(argv, cwd, env, identity)
            mark("agent.spawn.end", key)
            return started

        mod.process.spawn = traced_pspawn

    class _AsyncioProxy:
        """The runner's view of asyncio with create_subprocess_exec traced."""

        def __init__(self, real: Any, spawn: Any) -> None:
            self._real, self.create_subprocess_exec = real, spawn

        def __getattr__(self, name: str) -> Any:
            return getattr(self._real, name)

    def _patch_db(mod: Any) -> None:
        size = int(os.environ["BENCH_SQLITE_POOL"])
        create = mod.create_async_engine

        def sized(url: Any, **kw: Any) -> Any:
            if str(url).startswith("sqlite"):
                kw.update(pool_size=size, max_overflow=0)
            return create(url, **kw)

        mod.create_async_engine = sized

    def _patch_sqltime(mod: Any) -> None:
        """Count each SQL statement and its wall time; write the table every 2 s."""
        import threading
        from collections import defaultdict

        from sqlalchemy import event

        make = mod.make_engine
        stats: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        path = os.environ["BENCH_SQLTIME"]

        def dump() -> None:
            while True:
                time.sleep(2)
                rows = sorted(stats.items(), key=lambda kv: -kv[1][1])
                with open(path, "w") as fh:
                    for text, (n, total) in rows:
                        fh.write(f"{n:8d} {total * 1e3:10.1f} ms  {text[:160]}\n")

        threading.Thread(target=dump, daemon=True).start()

        def timed(url: Any) -> Any:
            engine = make(url)

            @event.listens_for(engine.sync_engine, "before_cursor_execute")
            def before(conn: Any, cursor: Any, statement: str, *a: Any) -> None:
                conn.info.setdefault("bench_t", []).append(time.perf_counter())

            @event.listens_for(engine.sync_engine, "after_cursor_execute")
            def after(conn: Any, cursor: Any, statement: str, *a: Any) -> None:
                began = conn.info["bench_t"].pop()
                entry = stats[" ".join(statement.split())]
                entry[0] += 1
                entry[1] += time.perf_counter() - began

            return engine

        mod.make_engine = timed

    if os.environ.get("BENCH_STALLS"):
        import asyncio
        import selectors
        import threading
        import traceback

        _stall_path = os.environ["BENCH_STALLS"]
        _main = threading.main_thread().ident
        _main_tid = threading.get_native_id()
        # The turn in progress: when its select() returned (None: in select), the main
        # thread's CPU time then, the collector's time so far, the callbacks it started
        # with; the watcher's stacks for it, and the thread's run-queue wait when the
        # watcher first saw it long (schedstat: was the thread running, or waiting for a
        # core?).
        _turn: list[Any] = [None, 0.0, 0.0, 0, [], None]
        # The collector's total time, when the current collection began, and the pauses of
        # this turn: "generation:ms" each.
        _gc_time: list[Any] = [0.0, 0.0, []]
        _select = selectors.EpollSelector.select

        def _gc_clock(phase: str, _info: Any) -> None:
            if phase == "start":
                _gc_time[1] = time.perf_counter()
            else:
                took = time.perf_counter() - _gc_time[1]
                _gc_time[0] += took
                if took >= 0.005:
                    _gc_time[2].append(f"{_info.get('generation')}:{took * 1e3:.0f}")

        import gc as _gc

        _gc.callbacks.append(_gc_clock)

        def _queued() -> float:
            try:
                with open(f"/proc/self/task/{_main_tid}/schedstat") as fh:
                    return int(fh.read().split()[1]) / 1e9
            except OSError:
                return float("nan")

        def _stall_select(self: Any, timeout: Any = None) -> Any:
            began, cpu, gct, ready, stacks, queued = _turn
            if began is not None:
                took = time.perf_counter() - began
                if took >= 0.05:
                    waited = _queued() - queued if queued is not None else float("nan")
                    with open(_stall_path, "a") as fh:
                        fh.write(f"== turn of {took * 1e3:.0f} ms at {time.time():.3f}: "
                                 f"cpu {(time.thread_time() - cpu) * 1e3:.0f} ms, gc "
                                 f"{(_gc_time[0] - gct) * 1e3:.0f} ms "
                                 f"[{' '.join(_gc_time[2])}], run-queue wait "
                                 f"{waited * 1e3:.0f} ms (after 20 ms), {ready} callbacks "
                                 f"at its start\n")
                        for at, text in stacks:
                            fh.write(f"-- at {at * 1e3:.0f} ms\n{text}")
            _turn[0] = None
            _gc_time[2] = []
            events = _select(self, timeout)
            loop = asyncio.events._get_running_loop()
            ready = len(events) + (len(loop._ready) if loop is not None else 0)  # noqa: SLF001
            _turn[:] = [time.perf_counter(), time.thread_time(), _gc_time[0], ready, [], None]
            return events

        selectors.EpollSelector.select = _stall_select  # type: ignore[method-assign]

        def _watch() -> None:
            stats_due = time.monotonic() + 10
            while True:
                time.sleep(0.01)
                if time.monotonic() >= stats_due:
                    stats_due += 10
                    with open(_stall_path, "a") as fh:
                        # Not gc.get_freeze_count(): it walks the frozen list with the
                        # interpreter lock held (100-250 ms at 10,000 agents).
                        with open("/proc/self/statm") as statm:
                            rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
                        fh.write(f"== gc at {time.time():.3f}: rss {rss / 2**20:.0f} MiB, "
                                 f"counts {_gc.get_count()}, stats {_gc.get_stats()}\n")
                began, _cpu, _gct, _ready, stacks, queued = _turn
                if began is None or time.perf_counter() - began < 0.02:
                    continue
                if queued is None:
                    _turn[5] = _queued()
                frame = sys._current_frames().get(_main)  # noqa: SLF001
                if frame is not None and _turn[0] is began:
                    text = "".join(traceback.format_stack(frame, limit=25))
                    stacks.append((time.perf_counter() - began, text))

        threading.Thread(target=_watch, name="bench-stalls", daemon=True).start()

    _PATCHES: dict[str, Any] = {}
    if os.environ.get("BENCH_SQLTIME"):
        _PATCHES["outpost.hub.db"] = _patch_sqltime
    if _trace is not None:
        _PATCHES.update({
            "outpost.hub.jobs": _patch_hub_jobs,
            "outpost.hub.dispatcher": _patch_dispatcher,
            "outpost.agent.transport": _patch_transport,
            "outpost.agent.runner": _patch_runner,
        })
    if os.environ.get("BENCH_SQLITE_POOL"):
        _PATCHES["outpost.hub.db"] = _patch_db

    class _Finder(importlib.abc.MetaPathFinder):
        """After one of the modules above executes, patch it (before anyone uses it)."""

        def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
            if name not in _PATCHES:
                return None
            for finder in sys.meta_path:
                if finder is self:
                    continue
                spec = getattr(finder, "find_spec", lambda *_: None)(name, path, target)
                if spec is not None and spec.loader is not None:
                    loader = spec.loader
                    original = loader.exec_module

                    def exec_module(module: Any, _orig: Any = original) -> None:
                        _orig(module)
                        _PATCHES[name](module)

                    loader.exec_module = exec_module  # type: ignore[method-assign]
                    return spec
            return None

    sys.meta_path.insert(0, _Finder())
