"""The function the platform workloads drive: a keyed counter, the smallest stateful function.

It is a module (not built inside a workload) because two kinds of child process import it by
name: the remote function server (``counter_remote``) and the sidecar whose memory is measured
(``memory_100k_keys``). The namespace comes from ``STATEFN_BENCH_NS`` so every workload of a run
gets its own stream and state.
"""

from __future__ import annotations

import os

import statefn
from statefn import Context, StatefulFunction

NS_ENV = "STATEFN_BENCH_NS"
FUNCTION_NAME = "counter"
HANDLER = "increment"


def function_type(namespace: str) -> str:
    return f"{namespace}/{FUNCTION_NAME}"


def make_app(namespace: str) -> statefn.App:
    counter = StatefulFunction(function_type(namespace))
    count = counter.state("count", int, default=0)

    @counter.handler
    async def increment(ctx: Context, by: int = 1) -> int:
        ctx[count] += by
        return ctx[count]

    return statefn.App(counter)


app = make_app(os.environ.get(NS_ENV, "bench"))
