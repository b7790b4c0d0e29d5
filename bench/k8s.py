"""``python -m bench.k8s``: the operator's costs on the e2e harness's real API server.

Scaling reaction (``bench.k8s_scaling``, on an agent node): lag appearing -> new replicas ready,
and zero replicas -> first reply, each against the same Deployment scaled directly.

Reconcile cost: N StatefulFunctions applied at once, time until every one is Provisioned and
the operator's CPU per reconcile, against the floor: the same provisioning (stream, consumers,
registration) and the same two server-side applies done directly, one function after another,
with the same clients. Then the operator's idle CPU with N functions, each autoscaler ticking.

Writes ``bench/results/k8s.json`` shaped like latest.json. ``make bench`` (``python -m bench``)
runs the same ``run`` after the data-plane workloads and merges its result into latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from bench import k8s_scaling, report
from e2e import harness, operator_proc
from e2e import node as agent_node
from statefn_operator import dataplane, kube, manifests, settings
from statefn_sidecar import devservers

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "k8s.json"
NS = "bench"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def function(name: str, partitions: int) -> dict[str, Any]:
    return {"apiVersion": "statefn.dev/v1alpha1", "kind": "StatefulFunction",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"function": f"{NS}/{name}", "image": "statefn:dev", "app": "examples.counter.app:app",
                     "partitions": partitions, "scaling": {"minReplicas": 1, "maxReplicas": 2}}}


async def floor(cluster: harness.ControlPlane, plane: operator_proc.DataPlane, n: int,
                partitions: int) -> list[float]:
    """Per function: provision + apply ServiceAccount + apply Deployment, directly, sequentially."""
    os.environ["KUBECONFIG"] = str(cluster.kubeconfig)
    await kube.load_config()
    cfg = settings.Settings(nats_url=plane.nats.url, etcd_endpoint=plane.etcd.endpoint)
    dp = await dataplane.DataPlane.connect(cfg.nats_url, cfg.etcd_endpoint)
    latencies = []
    try:
        async with kube.Kube() as api:
            for i in range(n):
                body = function(f"floor-{i}", partitions)
                body["metadata"]["uid"] = ""
                started = time.perf_counter()
                await dp.provision(manifests.function_type(body), partitions)
                await api.apply(manifests.service_account(body))
                await api.apply(manifests.deployment(body, cfg, 1))
                latencies.append(time.perf_counter() - started)
    finally:
        await dp.close()
    return latencies


def provisioned(cluster: harness.ControlPlane) -> int:
    out = cluster.kubectl("get", "sfn", "-n", NS, "-o", "json", check=False)
    if out.returncode != 0:
        return 0
    items = json.loads(out.stdout)["items"]
    return sum(1 for o in items if o.get("metadata", {}).get("name", "").startswith("op-") and any(
        c["type"] == "Provisioned" and c["status"] == "True" for c in o.get("status", {}).get("conditions", [])))


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


PHASES = ("starting the control plane", "scaling: the floor", "scaling: the operator", "reconcile: the floor",
          "reconcile: the operator", "idle CPU")


def scaling(cluster: harness.ControlPlane, plane: operator_proc.DataPlane, rounds: int,
            console: Console, phase: Callable[[str], None] = lambda _: None) -> dict[str, list[float]]:
    """Both scaling measurements with one agent node up; the node (and every pod) is gone afterwards."""
    with agent_node.running(cluster, "bench-node"):
        cluster.kubectl("create", "namespace", k8s_scaling.NS)
        phase(PHASES[1])
        console.print(f"scaling floor: the same Deployment scaled directly, {rounds} rounds")
        floor_wake, floor_up = asyncio.run(k8s_scaling.direct(cluster, plane, rounds, console))
        op = operator_proc.Operator(cluster, plane, "--standalone", "--namespace", k8s_scaling.NS,
                                    "--autoscale-interval", "1", name="operator-scaling")
        try:
            op.wait_for_log("statefn operator:")
            phase(PHASES[2])
            console.print(f"scaling by the operator's autoscaler (interval 1 s), {rounds} rounds")
            auto_wake, auto_up = asyncio.run(k8s_scaling.autoscaled(cluster, plane, rounds, console))
        finally:
            op.stop()
    return {"floor_wake": floor_wake, "floor_up": floor_up, "auto_wake": auto_wake, "auto_up": auto_up}


def run(n: int, partitions: int, idle_seconds: float, rounds: int, console: Console,
        phase: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Every Kubernetes workload on a fresh harness; ``phase`` is told each of ``PHASES`` as it starts."""
    phase(PHASES[0])
    cluster = harness.ControlPlane(harness.k8s_bin_dir())
    cluster.start()
    plane = operator_proc.DataPlane(cluster.workdir / "dataplane")
    plane.start()
    op: operator_proc.Operator | None = None
    try:
        cluster.kubectl("apply", "-f", str(harness.ROOT / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/statefulfunctions.statefn.dev")
        scaled = scaling(cluster, plane, rounds, console, phase)
        cluster.kubectl("create", "namespace", NS)
        phase(PHASES[3])
        console.print(f"floor: {n} functions provisioned and applied directly, one at a time")
        floor_lat = asyncio.run(floor(cluster, plane, n, partitions))
        floor_total = sum(floor_lat)

        op = operator_proc.Operator(cluster, plane, "--standalone", "--namespace", NS)
        op.wait_for_log("statefn operator:")
        time.sleep(2)  # the operator's start-up (watch setup) is not part of a reconcile
        cpu0 = cpu_seconds(op.proc.pid)
        docs = "\n---\n".join(json.dumps(function(f"op-{i}", partitions)) for i in range(n))
        phase(PHASES[4])
        console.print(f"operator: {n} StatefulFunctions applied at once")
        started = time.perf_counter()
        cluster.kubectl("apply", "-f", "-", stdin=docs)
        while (done := provisioned(cluster)) < n:
            if time.perf_counter() - started > 600:
                raise TimeoutError(f"only {done}/{n} provisioned after 600 s")
            time.sleep(0.25)
        elapsed = time.perf_counter() - started
        cpu_reconcile = cpu_seconds(op.proc.pid) - cpu0
        phase(PHASES[5])
        console.print(f"idle: {idle_seconds:.0f} s with {n} functions, autoscalers ticking")
        cpu1 = cpu_seconds(op.proc.pid)
        time.sleep(idle_seconds)
        idle_cpu = (cpu_seconds(op.proc.pid) - cpu1) / idle_seconds
    finally:
        if op is not None:
            op.stop()
        plane.stop()
        cluster.stop()
    floor_p50 = sorted(floor_lat)[len(floor_lat) // 2]
    return {
        "machine": report.machine(devservers.find_binary("nats-server"), devservers.find_binary("etcd"),
                                  "JetStream sync_interval always") + f", kube-apiserver {cluster.bins.name}",
        "workloads": {
            "floor_provision_apply": {"throughput": round(n / floor_total, 1), "p50_ms": round(floor_p50 * 1000, 1),
                                      "p99_ms": round(sorted(floor_lat)[int(len(floor_lat) * 0.99) - 1] * 1000, 1)},
            "operator_reconcile": {"throughput": round(n / elapsed, 1),
                                   "wall_ms_per_function": round(elapsed / n * 1000, 1),
                                   "all_provisioned_s": round(elapsed, 2),
                                   "cpu_ms_per_reconcile": round(cpu_reconcile / n * 1000, 1),
                                   "idle_cpu_percent": round(idle_cpu * 100, 2)},
            **{f"{who}_{what}": {"p50_s": round(median(xs), 2), "max_s": round(max(xs), 2), "runs": len(xs)}
               for who, label in (("floor", "floor"), ("operator", "auto"))
               for what, key in (("zero_to_first_reply", "wake"), ("lag_to_replicas_ready", "up"))
               for xs in [scaled[f"{label}_{key}"]]},
        },
        "ratios": {"operator_reconcile": {"throughput": round((n / elapsed) / (n / floor_total), 2)},
                   "operator_zero_to_first_reply": {"p50": round(median(scaled["auto_wake"])
                                                               / median(scaled["floor_wake"]), 2)},
                   "operator_lag_to_replicas_ready": {"p50": round(median(scaled["auto_up"])
                                                                 / median(scaled["floor_up"]), 2)}},
        "notes": (f"{n} functions x {partitions} partitions, all applied at once; floor = the same provisioning "
                  f"and applies done directly, one function at a time; idle CPU with each function's autoscaler "
                  f"ticking every {settings.Settings.model_fields['autoscale_interval'].default} s. Scaling: "
                  f"{k8s_scaling.PARTITIONS} partitions, max {k8s_scaling.MAX_REPLICAS} replicas, a burst of "
                  f"{k8s_scaling.BURST} x {k8s_scaling.WORK_MS} ms over {k8s_scaling.KEYS} keys, then at least "
                  f"{k8s_scaling.WAITING} messages kept waiting undelivered until the replicas are ready; the floor "
                  f"scales the same Deployment directly when the need arises (no lag detection); the operator's "
                  f"autoscaler runs every 1 s"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.k8s", description=__doc__.splitlines()[0])
    parser.add_argument("--functions", type=int, default=100)
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--scaling-rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    console = Console(width=160)
    doc = run(args.functions, args.partitions, args.idle_seconds, args.scaling_rounds, console)
    console.print_json(json.dumps(doc))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    console.print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
