"""The operator's pod template passes Pod Security "restricted" on a real kube-apiserver."""

from __future__ import annotations

import copy
import json

import pytest

from e2e import harness
from statefn_operator import manifests, settings

NS = "psa-restricted"
BODY = {"metadata": {"name": "counter", "namespace": NS},
        "spec": {"image": "statefn:dev", "app": "examples.counter.app:app", "partitions": 8}}


@pytest.fixture(scope="module")
def restricted(cluster: harness.ControlPlane) -> harness.ControlPlane:
    cluster.kubectl("create", "namespace", NS)
    cluster.kubectl("label", "namespace", NS, "pod-security.kubernetes.io/enforce=restricted",
                    "pod-security.kubernetes.io/warn=restricted")
    return cluster


def _apply(cluster: harness.ControlPlane, obj: dict[str, object]) -> tuple[int, str]:
    out = cluster.kubectl("apply", "--dry-run=server", "-f", "-", stdin=json.dumps(obj), check=False)
    return out.returncode, out.stderr


def test_function_pod_template_is_admitted_as_restricted(restricted: harness.ControlPlane) -> None:
    dep = manifests.deployment(BODY, settings.Settings(nats_url="nats://nats:4222", etcd_endpoint="etcd:2379"), 1)
    assert _apply(restricted, manifests.service_account(BODY)) == (0, "")
    code, warnings = _apply(restricted, dep)
    assert code == 0 and "PodSecurity" not in warnings, warnings


def test_the_check_can_fail(restricted: harness.ControlPlane) -> None:
    """A template without the hardening is reported by the same admission (the test is not vacuous)."""
    dep = copy.deepcopy(manifests.deployment(BODY, settings.Settings(nats_url="n", etcd_endpoint="e"), 1))
    del dep["spec"]["template"]["spec"]["initContainers"][0]["securityContext"]
    code, warnings = _apply(restricted, dep)
    assert code == 0 and 'would violate PodSecurity "restricted:latest"' in warnings, warnings
