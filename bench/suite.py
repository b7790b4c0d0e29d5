"""The workload registry, and the runner: in order, against one pair of servers, with a progress bar.

The floors run first, on the same nats-server and etcd the platform workloads use next, so the
ratios compare like with like (same disks, same server state, same moment's machine noise).
A workload that fails (an error, or work lost) is reported as failed and the others still run;
one that cannot run in this tree (``procs.Unavailable``) is reported as skipped.

Adding a workload is a function plus one ``Workload`` entry in ``REGISTRY``: its ``run`` gets
an ``Env`` (sizes, server addresses, and the running platform when it has one) and a progress
tick, and returns a ``stats.Result`` (a row of the table) or a ``stats.Sweep`` (a line of the
plots). Consecutive entries with the same ``platform`` factory share one running platform.
"""

from __future__ import annotations

import contextlib
import cProfile
import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path

from rich import progress
from rich.console import Console

from bench import floor, procs, stats, workloads

FLOOR_SINGLE = "floor_single"
FLOOR_BATCHED = "floor_batched"
EMBEDDED_SINGLE = "counter_embedded_single"
EMBEDDED = "counter_embedded"
TRACED = "counter_traced"
REMOTE = "counter_remote"
MEMORY = "memory_100k_keys"
FLOOR_CALL = "floor_call"
CALL_SINGLE = "call_embedded_single"
CALL = "call_embedded"
FLOOR_SAGA = "floor_saga"
SAGA_SINGLE = "saga_embedded_single"
TX_SINGLE = "tx_embedded_single"
TX = "tx_embedded"
TX_PARALLEL_SINGLE = "tx_parallel_embedded_single"
# Keys one fan-out invocation sends to.
FANOUTS = (10, 100)
SWEEP_PREFIX = "sweep_"  # registry names of sweeps; their key in the JSON's "sweeps" drops it


@dataclasses.dataclass(frozen=True)
class Sizes:
    floor_single: int = 2_000
    floor_call: int = 700
    call_single: int = 500
    call_load: int = 5_000
    saga_single: int = 300
    tx_single: int = 300
    tx_load: int = 3_000
    floor_warmup: int = 100
    floor_batched: int = 20_000
    single: int = 1_000
    single_keys: int = 100
    load: int = 10_000
    load_keys: int = 1_000
    concurrency: int = 256
    remote: int = 10_000
    memory_keys: int = 100_000
    # Concurrency sweeps: at each level, max(sweep_min, level * sweep_per_flight) operations.
    sweep_levels: tuple[int, ...] = (1, 4, 16, 64, 256)
    sweep_min: int = 1_500
    sweep_per_flight: int = 20
    # Fan-out: rounds = max(3, fanout_messages // N), one fan-out in flight.
    fanout_messages: int = 3_000

    def sweep_counts(self) -> tuple[int, ...]:
        return tuple(max(self.sweep_min, level * self.sweep_per_flight) for level in self.sweep_levels)

    def fanout_rounds(self, n: int) -> int:
        return max(3, self.fanout_messages // n)


FULL = Sizes()
QUICK = Sizes(floor_single=50, floor_call=20, call_single=20, call_load=100, saga_single=10, tx_single=10,
              tx_load=100, floor_warmup=5, floor_batched=512, single=30, single_keys=10, load=300,
              load_keys=50, concurrency=32, remote=200, memory_keys=500, sweep_levels=(1, 4, 32), sweep_min=40,
              sweep_per_flight=4, fanout_messages=30)


@dataclasses.dataclass(frozen=True)
class Env:
    """What a workload's ``run`` gets: sizes, the servers, and the platform its entry runs on."""

    sizes: Sizes
    nats_url: str
    etcd_endpoint: str
    platform: workloads.Platform | None = None

    @property
    def p(self) -> workloads.Platform:
        assert self.platform is not None, "a platform workload's entry needs a platform factory"
        return self.platform


Measured = stats.Result | stats.Sweep
PlatformFactory = Callable[[str, str], contextlib.AbstractAsyncContextManager[workloads.Platform]]


@dataclasses.dataclass(frozen=True)
class Workload:
    """One registry entry: what runs, on which platform, and which floors its ratios are against."""

    name: str
    run: Callable[[Env, stats.Tick], Awaitable[Measured]]
    total: Callable[[Sizes], int]  # operations measured (the progress bar's length)
    platform: PlatformFactory | None = None  # None: raw clients, no sidecar (a floor)
    throughput_floor: str | None = FLOOR_BATCHED  # the ratios' denominators (None: no ratio)
    p50_floor: str | None = FLOOR_SINGLE
    baseline: str | None = None  # a workload this one is a variant of: the table prints "x baseline"

    @property
    def is_sweep(self) -> bool:
        return self.name.startswith(SWEEP_PREFIX)


def _fanout_floor(n: int) -> Workload:
    return Workload(f"floor_fanout_{n}", lambda e, tick: floor.floor_fanout(
        e.nats_url, e.etcd_endpoint, fanout=n, rounds=e.sizes.fanout_rounds(n), tick=tick),
        lambda s: n * s.fanout_rounds(n), throughput_floor=f"floor_fanout_{n}", p50_floor=f"floor_fanout_{n}")


def _fanout(n: int) -> Workload:
    return Workload(f"fanout_{n}", lambda e, tick: workloads.fan_out(
        e.p, fanout=n, rounds=e.sizes.fanout_rounds(n), tick=tick),
        lambda s: n * s.fanout_rounds(n), platform=workloads.fanout,
        throughput_floor=f"floor_fanout_{n}", p50_floor=f"floor_fanout_{n}")


async def _floor_sweep(e: Env, tick: stats.Tick) -> stats.Sweep:
    points = []
    for level, count in zip(e.sizes.sweep_levels, e.sizes.sweep_counts(), strict=True):
        points.append((level, await floor.floor_pipelined(e.nats_url, e.etcd_endpoint, count=count,
                                                          in_flight=level, tick=tick)))
    return stats.Sweep(points)


def _platform_sweep(e: Env, tick: stats.Tick) -> Awaitable[stats.Sweep]:
    s = e.sizes
    return workloads.sweep(e.p, levels=s.sweep_levels, counts=s.sweep_counts(), key_count=s.load_keys, tick=tick)


def _sweep_total(s: Sizes) -> int:
    return sum(s.sweep_counts())


REGISTRY: tuple[Workload, ...] = (
    Workload(FLOOR_SINGLE, lambda e, tick: floor.floor_single(
        e.nats_url, e.etcd_endpoint, count=e.sizes.floor_single, warmup=e.sizes.floor_warmup, tick=tick),
        lambda s: s.floor_single),
    Workload(FLOOR_BATCHED, lambda e, tick: floor.floor_batched(
        e.nats_url, e.etcd_endpoint, count=e.sizes.floor_batched, tick=tick), lambda s: s.floor_batched),
    *(_fanout_floor(n) for n in FANOUTS),
    Workload(FLOOR_CALL, lambda e, tick: floor.floor_call(
        e.nats_url, e.etcd_endpoint, count=e.sizes.floor_call, warmup=e.sizes.floor_warmup, tick=tick),
        lambda s: s.floor_call, throughput_floor=FLOOR_CALL, p50_floor=FLOOR_CALL),
    Workload(FLOOR_SAGA, lambda e, tick: floor.floor_call(
        e.nats_url, e.etcd_endpoint, count=e.sizes.saga_single, warmup=e.sizes.floor_warmup, tick=tick, hops=5),
        lambda s: s.saga_single, throughput_floor=FLOOR_SAGA, p50_floor=FLOOR_SAGA),
    Workload(f"{SWEEP_PREFIX}floor", _floor_sweep, _sweep_total),
    Workload(EMBEDDED_SINGLE, lambda e, tick: workloads.single(
        e.p, count=e.sizes.single, key_count=e.sizes.single_keys, tick=tick),
        lambda s: s.single, platform=workloads.embedded),
    Workload(EMBEDDED, lambda e, tick: workloads.load(
        e.p, count=e.sizes.load, key_count=e.sizes.load_keys, concurrency=e.sizes.concurrency, tick=tick),
        lambda s: s.load, platform=workloads.embedded),
    Workload(f"{SWEEP_PREFIX}{EMBEDDED}", _platform_sweep, _sweep_total, platform=workloads.embedded),
    # Tracing on, every invocation sampled and exported (to a receiver in another process), against the same
    # load untraced: what tracing costs. Off, the hot path checks one attribute per batch.
    Workload(TRACED, lambda e, tick: workloads.traced_load(
        e.p, count=e.sizes.load, key_count=e.sizes.load_keys, concurrency=e.sizes.concurrency, tick=tick),
        lambda s: s.load, platform=workloads.embedded_traced, baseline=EMBEDDED),
    *(_fanout(n) for n in FANOUTS),
    # Durable calls: the relay calls the counter of the same key and returns its reply. One in flight
    # against the call floor (three hops); many in flight against the batched floor (three commits each).
    Workload(CALL_SINGLE, lambda e, tick: workloads.load(
        e.p, count=e.sizes.call_single, key_count=e.sizes.single_keys, concurrency=1, tick=tick, prefix="s"),
        lambda s: s.call_single, platform=workloads.calls, throughput_floor=FLOOR_CALL, p50_floor=FLOOR_CALL),
    Workload(CALL, lambda e, tick: workloads.load(
        e.p, count=e.sizes.call_load, key_count=e.sizes.load_keys, concurrency=e.sizes.concurrency, tick=tick),
        lambda s: s.call_load, platform=workloads.calls),
    # A saga of two steps, one in flight, against the I/O of its five hops.
    Workload(SAGA_SINGLE, lambda e, tick: workloads.load(
        e.p, count=e.sizes.saga_single, key_count=e.sizes.single_keys, concurrency=1, tick=tick, prefix="s"),
        lambda s: s.saga_single, platform=workloads.sagas, throughput_floor=FLOOR_SAGA, p50_floor=FLOOR_SAGA),
    # A transaction over two counters: its reply waits for the same five hops as the saga (the participants
    # apply the decision after it); many in flight against the batched floor (seven commits each).
    Workload(TX_SINGLE, lambda e, tick: workloads.load(
        e.p, count=e.sizes.tx_single, key_count=e.sizes.single_keys, concurrency=1, tick=tick, prefix="s"),
        lambda s: s.tx_single, platform=workloads.transactions, throughput_floor=FLOOR_SAGA, p50_floor=FLOOR_SAGA),
    Workload(TX, lambda e, tick: workloads.load(
        e.p, count=e.sizes.tx_load, key_count=e.sizes.load_keys, concurrency=e.sizes.concurrency, tick=tick),
        lambda s: s.tx_load, platform=workloads.transactions),
    # The same transaction preparing both counters at once: the two prepares' hops overlap.
    Workload(TX_PARALLEL_SINGLE, lambda e, tick: workloads.load(
        e.p, count=e.sizes.tx_single, key_count=e.sizes.single_keys, concurrency=1, tick=tick, prefix="s"),
        lambda s: s.tx_single, platform=workloads.transactions_parallel, throughput_floor=FLOOR_SAGA,
        p50_floor=FLOOR_SAGA),
    Workload(REMOTE, lambda e, tick: workloads.load(
        e.p, count=e.sizes.remote, key_count=e.sizes.load_keys, concurrency=e.sizes.concurrency, tick=tick),
        lambda s: s.remote, platform=workloads.remote),
    Workload(f"{SWEEP_PREFIX}{REMOTE}", _platform_sweep, _sweep_total, platform=workloads.remote),
    Workload(MEMORY, lambda e, tick: workloads.memory(
        e.p, key_count=e.sizes.memory_keys, concurrency=e.sizes.concurrency, tick=tick),
        lambda s: s.memory_keys, platform=workloads.sidecar_process),
)
BY_NAME = {w.name: w for w in REGISTRY}
NAMES = tuple(BY_NAME)


def sweep_key(name: str) -> str:
    """``sweep_counter_embedded`` -> ``counter_embedded``: the key in the JSON and the plots' legend."""
    return name.removeprefix(SWEEP_PREFIX)


def totals(sizes: Sizes) -> dict[str, int]:
    """Operations each workload measures (the progress bars' lengths)."""
    return {w.name: w.total(sizes) for w in REGISTRY}


@dataclasses.dataclass
class Outcome:
    results: dict[str, stats.Result] = dataclasses.field(default_factory=dict)
    sweeps: dict[str, stats.Sweep] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)

    def done(self, name: str) -> bool:
        return name in self.results or name in self.sweeps


def _groups(selected: list[Workload]) -> list[list[Workload]]:
    """Consecutive entries with the same platform factory run on one platform; floors one by one."""
    groups: list[list[Workload]] = []
    for w in selected:
        if groups and w.platform is not None and groups[-1][0].platform is w.platform:
            groups[-1].append(w)
        else:
            groups.append([w])
    return groups


class Suite:
    def __init__(self, names: list[str], sizes: Sizes, nats_url: str, etcd_endpoint: str, console: Console,
                 profile_dir: Path | None = None) -> None:
        self.names = names
        self.sizes = sizes
        self.nats_url = nats_url
        self.etcd_endpoint = etcd_endpoint
        self.console = console
        self.profile_dir = profile_dir
        self.outcome = Outcome()
        self._bar = progress.Progress(
            progress.TextColumn("{task.description:<26}"), progress.BarColumn(),
            progress.MofNCompleteColumn(), progress.TextColumn("{task.fields[state]}"),
            progress.TimeElapsedColumn(), console=console,
        )
        self._tasks: dict[str, progress.TaskID] = {}

    async def run(self) -> Outcome:
        selected = [w for w in REGISTRY if w.name in self.names]
        with self._bar:
            for w in selected:
                self._tasks[w.name] = self._bar.add_task(w.name, total=w.total(self.sizes), state="waiting",
                                                         start=False)
            env = Env(self.sizes, self.nats_url, self.etcd_endpoint)
            for group in _groups(selected):
                if group[0].platform is None:
                    await self._measure(group[0], env)
                else:
                    await self._on_platform(group[0].platform, group, env)
        return self.outcome

    async def _on_platform(self, factory: PlatformFactory, group: list[Workload], env: Env) -> None:
        """Start one platform for the entries that run on it; a failed start fails them all."""
        for w in group:
            self._state(w.name, "starting the sidecar")
        try:
            async with factory(self.nats_url, self.etcd_endpoint) as platform:
                on = dataclasses.replace(env, platform=platform)
                for w in group:
                    await self._measure(w, on)
                for w in group:
                    self._state(w.name, "stopping the sidecar" if self.outcome.done(w.name) else "")
        except procs.Unavailable as exc:
            for w in group:
                self._record_skip(w.name, str(exc))
        except Exception as exc:
            for w in group:
                if not self.outcome.done(w.name) and w.name not in self.outcome.failed:
                    self._record_failure(w.name, exc)
            if all(self.outcome.done(w.name) for w in group):
                self.console.print(
                    f"[yellow]warning:[/] stopping the platform failed: {type(exc).__name__}: {exc}")
        for w in group:
            if self.outcome.done(w.name):
                self._state(w.name, "[green]done")

    async def _measure(self, w: Workload, env: Env) -> None:
        task = self._tasks[w.name]
        self._bar.start_task(task)
        self._state(w.name, "running")
        profiler = cProfile.Profile() if self.profile_dir is not None else None
        try:
            if profiler is not None:
                profiler.enable()
            try:
                measured = await w.run(env, lambda n: self._bar.advance(task, n))
            finally:
                if profiler is not None:
                    profiler.disable()
                    assert self.profile_dir is not None
                    self.profile_dir.mkdir(parents=True, exist_ok=True)
                    profiler.dump_stats(self.profile_dir / f"{w.name}.prof")
        except procs.Unavailable as exc:
            self._record_skip(w.name, str(exc))
            return
        except Exception as exc:
            self._record_failure(w.name, exc)
            return
        if isinstance(measured, stats.Sweep):
            self.outcome.sweeps[w.name] = measured
        else:
            self.outcome.results[w.name] = measured
        self._state(w.name, "[green]done")

    def _state(self, name: str, state: str) -> None:
        if name in self._tasks:
            self._bar.update(self._tasks[name], state=state)

    def _record_skip(self, name: str, reason: str) -> None:
        self.outcome.skipped[name] = reason
        self._state(name, "[yellow]skipped")

    def _record_failure(self, name: str, exc: BaseException) -> None:
        self.outcome.failed[name] = f"{type(exc).__name__}: {exc}"
        self._state(name, "[red]failed")
        self.console.print(f"[red]{name} failed:[/] {type(exc).__name__}: {exc}")
