"""Two operator replicas with kopf peering: one acts, the other takes over when it stops."""

from __future__ import annotations

import json
import time

from e2e import harness, objects, operator_proc
from e2e.objects import condition, wait_for

NS = "op-peering"


def apply(cluster: harness.ControlPlane, name: str) -> None:
    manifest = objects.function(name, NS, image=objects.NO_PODS_IMAGE, partitions=2,
                                scaling={"minReplicas": 1, "maxReplicas": 2})
    cluster.kubectl("apply", "-f", "-", stdin=manifest)


def provisioned(cluster: harness.ControlPlane, name: str) -> bool:
    obj = objects.get(cluster, NS, "sfn", name)
    return condition(obj, "Provisioned").get("status") == "True"


def paused(log: str) -> bool:
    """Whether kopf's last word on peering in this log leaves the operator paused.

    With a mandatory peering kopf starts paused and logs nothing until it resumes; a replica that resumed and then saw a
    higher priority logs "Pausing operations". Which of the two a standby shows depends on who wrote a keep-alive first.
    """
    resumed, pausing = log.rfind("Resuming operations"), log.rfind("Pausing operations")
    return resumed < pausing or resumed == -1


def registered(cluster: harness.ControlPlane, priority: int) -> bool:
    """Whether a peer of this priority has written its keep-alive into the KopfPeering object."""
    status = objects.get(cluster, NS, "kopfpeering", "statefn").get("status") or {}
    return any(isinstance(peer, dict) and peer.get("priority") == priority for peer in status.values())


def test_only_the_leader_acts_and_a_standby_takes_over(crds: harness.ControlPlane,
                                                       plane: operator_proc.DataPlane) -> None:
    cluster = crds
    cluster.kubectl("create", "namespace", NS)
    peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "statefn", "namespace": NS}}
    cluster.kubectl("apply", "-f", "-", stdin=json.dumps(peering))
    common = ("--namespace", NS, "--peering", "statefn")
    low = operator_proc.Operator(cluster, plane, *common, "--priority", "10", name="operator-low")
    high = operator_proc.Operator(cluster, plane, *common, "--priority", "20", name="operator-high")
    try:
        low.wait_for_log("statefn operator:")
        high.wait_for_log("statefn operator:")
        # Peering settles: until the standby has seen the leader's keep-alive, a standby that found no peer at
        # its first look acts (kopf pauses it when it notices the leader). Only the leader acts from then on.
        settled = lambda: registered(cluster, 20) and paused(low.log())  # noqa: E731
        wait_for(settled, what="the standby paused for the leader")
        time.sleep(1.0)  # a peering event from before the leader's keep-alive may still be on its way to the standby
        wait_for(settled, what="the standby still paused for the leader")
        apply(cluster, "first")
        wait_for(lambda: provisioned(cluster, "first"), what="first Provisioned")
        assert "reconciled op-peering/first" in high.log()
        assert "reconciled op-peering/first" not in low.log()
        assert paused(low.log()), low.log()[-3000:]

        high.stop()  # SIGTERM: it leaves the peering, the standby resumes
        apply(cluster, "second")
        wait_for(lambda: provisioned(cluster, "second"), timeout=60, what="second Provisioned by the standby")
        assert "reconciled op-peering/second" in low.log()
    finally:
        high.stop()
        low.stop()
