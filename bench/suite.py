"""Runs the selected workloads in order against one pair of servers, with a progress bar.

The floors run first, on the same nats-server and etcd the platform workloads use next, so the
ratios compare like with like (same disks, same server state, same moment's machine noise).
A workload that fails (an error, or work lost) is reported as failed and the others still run;
one that cannot run in this tree (``procs.Unavailable``) is reported as skipped.
"""

from __future__ import annotations

import contextlib
import cProfile
import dataclasses
import functools
from collections.abc import Awaitable, Callable
from pathlib import Path

from rich import progress
from rich.console import Console

from bench import floor, procs, stats, workloads

FLOOR_SINGLE = "floor_single"
FLOOR_BATCHED = "floor_batched"
EMBEDDED_SINGLE = "counter_embedded_single"
EMBEDDED = "counter_embedded"
REMOTE = "counter_remote"
MEMORY = "memory_100k_keys"
NAMES = (FLOOR_SINGLE, FLOOR_BATCHED, EMBEDDED_SINGLE, EMBEDDED, REMOTE, MEMORY)


@dataclasses.dataclass(frozen=True)
class Sizes:
    floor_single: int = 2_000
    floor_warmup: int = 100
    floor_batched: int = 20_000
    single: int = 1_000
    single_keys: int = 100
    load: int = 10_000
    load_keys: int = 1_000
    concurrency: int = 256
    remote: int = 10_000
    memory_keys: int = 100_000


FULL = Sizes()
QUICK = Sizes(floor_single=50, floor_warmup=5, floor_batched=512, single=30, single_keys=10, load=300,
              load_keys=50, concurrency=32, remote=200, memory_keys=500)


def totals(sizes: Sizes) -> dict[str, int]:
    """Operations each workload measures (the progress bars' lengths)."""
    return {FLOOR_SINGLE: sizes.floor_single, FLOOR_BATCHED: sizes.floor_batched,
            EMBEDDED_SINGLE: sizes.single, EMBEDDED: sizes.load, REMOTE: sizes.remote,
            MEMORY: sizes.memory_keys}


@dataclasses.dataclass
class Outcome:
    results: dict[str, stats.Result] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)


Step = Callable[[workloads.Platform, stats.Tick], Awaitable[stats.Result]]
PlatformFactory = Callable[[str, str], contextlib.AbstractAsyncContextManager[workloads.Platform]]


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
        with self._bar:
            for name, total in totals(self.sizes).items():
                if name in self.names:
                    self._tasks[name] = self._bar.add_task(name, total=total, state="waiting", start=False)
            s = self.sizes
            await self._measure(FLOOR_SINGLE, lambda tick: floor.floor_single(
                self.nats_url, self.etcd_endpoint, count=s.floor_single, warmup=s.floor_warmup, tick=tick))
            await self._measure(FLOOR_BATCHED, lambda tick: floor.floor_batched(
                self.nats_url, self.etcd_endpoint, count=s.floor_batched, tick=tick))
            await self._on_platform(workloads.embedded, [
                (EMBEDDED_SINGLE, lambda p, tick: workloads.single(p, count=s.single, key_count=s.single_keys,
                                                                   tick=tick)),
                (EMBEDDED, lambda p, tick: workloads.load(p, count=s.load, key_count=s.load_keys,
                                                          concurrency=s.concurrency, tick=tick)),
            ])
            await self._on_platform(workloads.remote, [
                (REMOTE, lambda p, tick: workloads.load(p, count=s.remote, key_count=s.load_keys,
                                                        concurrency=s.concurrency, tick=tick)),
            ])
            await self._on_platform(workloads.sidecar_process, [
                (MEMORY, lambda p, tick: workloads.memory(p, key_count=s.memory_keys,
                                                          concurrency=s.concurrency, tick=tick)),
            ])
        return self.outcome

    async def _on_platform(self, factory: PlatformFactory, steps: list[tuple[str, Step]]) -> None:
        """Start one platform for the selected steps that run on it; a failed start fails them all."""
        steps = [(n, st) for n, st in steps if n in self.names]
        if not steps:
            return
        for name, _ in steps:
            self._state(name, "starting the sidecar")
        try:
            async with factory(self.nats_url, self.etcd_endpoint) as platform:
                for name, step in steps:
                    await self._measure(name, functools.partial(step, platform))
                for name, _ in steps:
                    self._state(name, "stopping the sidecar" if name in self.outcome.results else "")
        except procs.Unavailable as exc:
            for name, _ in steps:
                self._record_skip(name, str(exc))
        except Exception as exc:
            for name, _ in steps:
                if name not in self.outcome.results and name not in self.outcome.failed:
                    self._record_failure(name, exc)
            if all(n in self.outcome.results for n, _ in steps):
                self.console.print(
                    f"[yellow]warning:[/] stopping the platform failed: {type(exc).__name__}: {exc}")
        for name, _ in steps:
            if name in self.outcome.results:
                self._state(name, "[green]done")

    async def _measure(self, name: str, run: Callable[[stats.Tick], Awaitable[stats.Result]]) -> None:
        if name not in self.names:
            return
        task = self._tasks[name]
        self._bar.start_task(task)
        self._state(name, "running")
        profiler = cProfile.Profile() if self.profile_dir is not None else None
        try:
            if profiler is not None:
                profiler.enable()
            try:
                self.outcome.results[name] = await run(lambda n: self._bar.advance(task, n))
            finally:
                if profiler is not None:
                    profiler.disable()
                    assert self.profile_dir is not None
                    self.profile_dir.mkdir(parents=True, exist_ok=True)
                    profiler.dump_stats(self.profile_dir / f"{name}.prof")
        except procs.Unavailable as exc:
            self._record_skip(name, str(exc))
            return
        except Exception as exc:
            self._record_failure(name, exc)
            return
        self._state(name, "[green]done")

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
