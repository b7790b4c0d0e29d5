"""The CRDs on a real kube-apiserver: defaults, printer columns, and refusals with the CEL message."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from e2e import harness

VALID = """
apiVersion: statefn.dev/v1alpha1
kind: StatefulFunction
metadata: {name: NAME}
spec: SPEC
"""


def manifest(name: str, spec: dict[str, object]) -> str:
    return VALID.replace("NAME", name).replace("SPEC", json.dumps(spec))


@pytest.fixture(autouse=True, scope="module")
def leave_default_empty(crds: harness.ControlPlane) -> Iterator[None]:
    """These tests write to ``default``, where test_platform later runs the example for real."""
    yield
    crds.kubectl("delete", "sfn,workflows", "--all", "-n", "default", "--wait=false")


def test_example_applies_with_defaults_and_columns(crds: harness.ControlPlane) -> None:
    crds.kubectl("apply", "-f", str(harness.ROOT / "examples" / "counter" / "k8s"))
    obj = json.loads(crds.kubectl("get", "statefulfunction", "counter", "-o", "json").stdout)
    assert obj["spec"]["partitions"] == 8
    assert obj["spec"]["deletionPolicy"] == "Retain"
    assert obj["spec"]["maxAttempts"] == 5
    assert obj["spec"]["scaling"]["scaleDownStabilizationSeconds"] == 300
    header = crds.kubectl("get", "sfn").stdout.splitlines()[0].split()
    assert header == ["NAME", "READY", "REPLICAS", "LAG", "NEXT-WAKE-UP", "AGE"]
    wide = crds.kubectl("get", "statefulfunctions", "-o", "wide").stdout.splitlines()[0].split()
    assert wide == ["NAME", "READY", "REPLICAS", "LAG", "NEXT-WAKE-UP", "PARTITIONS", "AGE"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"image": "i", "app": "m:a", "scaling": {"minReplicas": 3, "maxReplicas": 2}},
         "spec.scaling.minReplicas: Invalid value: \"object\": scaling.minReplicas must be <= scaling.maxReplicas"),
        ({"app": "m:a"}, "spec.image: Required value"),
        ({"image": "i", "app": "m:a", "partitions": 0},
         "spec.partitions: Invalid value: 0: spec.partitions in body should be greater than or equal to 1"),
        ({"image": "i", "app": "m:a", "partitions": 2000},
         "spec.partitions: Invalid value: 2000: spec.partitions in body should be less than or equal to 1024"),
        ({"image": "i", "app": "m:a", "partitions": 2, "scaling": {"maxReplicas": 3}},
         "scaling.maxReplicas must be <= partitions (a partition has one owner at a time)"),
        ({"image": "i", "app": "not a module"}, "spec.app in body should match"),
        ({"image": "i", "app": "m:a", "deletionPolicy": "Sometimes"},
         'spec.deletionPolicy: Unsupported value: "Sometimes": supported values: "Retain", "Delete"'),
    ],
    ids=["min>max", "no-image", "partitions-0", "partitions-2000", "replicas>partitions", "bad-app", "bad-policy"],
)
def test_invalid_function_is_refused(crds: harness.ControlPlane, spec: dict[str, object], message: str) -> None:
    out = crds.kubectl("apply", "-f", "-", stdin=manifest("bad", spec), check=False)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr


def test_partitions_are_immutable(crds: harness.ControlPlane) -> None:
    crds.kubectl("apply", "-f", "-", stdin=manifest("fixed", {"image": "i", "app": "m:a", "partitions": 4}))
    out = crds.kubectl("apply", "-f", "-", stdin=manifest("fixed", {"image": "i", "app": "m:a", "partitions": 8}),
                       check=False)
    assert out.returncode != 0
    assert "partitions is immutable (it decides where every key's state lives)" in out.stderr


WORKFLOW = """
apiVersion: statefn.dev/v1alpha1
kind: Workflow
metadata: {name: NAME}
spec: SPEC
"""

STEP = {"name": "reserve", "function": "shop/stock", "key": "input.sku", "handler": "reserve",
        "compensation": {"handler": "release"}}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"steps": [STEP, STEP]}, 'spec.steps[1]: Duplicate value: map[string]interface {}{"name":"reserve"}'),
        ({"consistency": "serializable", "steps": [STEP]},
         "serializable workflows abort together; compensations are for sagas only"),
        ({"steps": [{k: v for k, v in STEP.items() if k != "key"}]}, "spec.steps[0].key: Required value"),
        ({"steps": []}, "spec.steps: Invalid value: 0: spec.steps in body should have at least 1 items"),
        ({"steps": [dict(STEP, function="Shop_Stock")]}, "spec.steps[0].function in body should match"),
    ],
    ids=["duplicate-steps", "serializable-compensation", "no-key", "no-steps", "bad-function"],
)
def test_invalid_workflow_is_refused(crds: harness.ControlPlane, spec: dict[str, object], message: str) -> None:
    out = crds.kubectl("apply", "-f", "-", stdin=WORKFLOW.replace("NAME", "bad").replace("SPEC", json.dumps(spec)),
                       check=False)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr


def test_valid_workflow_gets_defaults(crds: harness.ControlPlane) -> None:
    crds.kubectl("apply", "-f", "-", stdin=WORKFLOW.replace("NAME", "order").replace("SPEC", json.dumps(
        {"steps": [STEP, dict(STEP, name="pay", function="shop/payment", handler="charge")]})))
    obj = json.loads(crds.kubectl("get", "workflow", "order", "-o", "json").stdout)
    assert (obj["spec"]["consistency"], obj["spec"]["timeoutSeconds"]) == ("saga", 60)
