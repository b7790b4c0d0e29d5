"""The pod template a StatefulFunction becomes (no cluster needed; e2e checks admission)."""

from __future__ import annotations

from typing import Any

from statefn_operator import manifests

BODY: dict[str, Any] = {
    "apiVersion": "statefn.dev/v1alpha1", "kind": "StatefulFunction",
    "metadata": {"name": "counter", "namespace": "shop", "uid": "u-1", "generation": 3},
    "spec": {"image": "registry.local/shop:1.2", "app": "shop.app:app", "partitions": 8,
             "maxStateBytes": 65536, "scaling": {"minReplicas": 2, "maxReplicas": 4},
             "env": [{"name": "MODE", "value": "prod"}], "resources": {"limits": {"memory": "256Mi"}}},
}
SETTINGS = manifests.Settings(nats_url="nats://nats:4222", etcd_endpoint="etcd:2379")


def test_deployment_runs_function_and_native_sidecar() -> None:
    dep = manifests.deployment(BODY, SETTINGS)
    assert dep["metadata"]["name"] == "sfn-counter" and dep["metadata"]["namespace"] == "shop"
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    (function,) = pod["containers"]
    (sidecar,) = pod["initContainers"]
    assert function["command"] == ["statefn", "serve", "shop.app:app", "--host", "127.0.0.1", "--port", "9000"]
    assert function["env"] == [{"name": "MODE", "value": "prod"}]
    assert function["resources"] == {"limits": {"memory": "256Mi"}}
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == "registry.local/shop:1.2"
    assert sidecar["command"] == ["statefn", "sidecar", "--remote", "http://127.0.0.1:9000", "--health-port", "8081",
                                  "--partitions", "8", "--max-state-bytes", "65536"]
    assert {e["name"]: e.get("value") for e in sidecar["env"]} == {
        "STATEFN_NATS": "nats://nats:4222", "STATEFN_ETCD": "etcd:2379", "STATEFN_MEMBER_ID": None}
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert pod["serviceAccountName"] == "sfn-counter" and pod["automountServiceAccountToken"] is False


def test_pod_template_is_restricted() -> None:
    pod = manifests.deployment(BODY, SETTINGS)["spec"]["template"]["spec"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    for c in pod["containers"] + pod["initContainers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["runAsNonRoot"] is True and sc["runAsUser"] > 0
        assert sc["capabilities"] == {"drop": ["ALL"]} and sc["readOnlyRootFilesystem"] is True
    assert all("hostPath" not in v for v in pod["volumes"])


def test_labels_and_immutable_selector() -> None:
    dep = manifests.deployment(BODY, SETTINGS)
    assert dep["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/instance": "sfn-counter", "statefn.dev/function": "shop.counter"}
    assert dep["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "function"
    assert manifests.selector_string(BODY) == "app.kubernetes.io/instance=sfn-counter,statefn.dev/function=shop.counter"
    sa = manifests.service_account(BODY)
    assert sa["automountServiceAccountToken"] is False and sa["metadata"]["name"] == "sfn-counter"


def test_defaults_when_optional_fields_are_absent() -> None:
    body = {"metadata": {"name": "c", "namespace": "d"}, "spec": {"image": "i", "app": "m:a"}}
    dep = manifests.deployment(body, manifests.Settings("n", "e", sidecar_image="statefn:1"))
    pod = dep["spec"]["template"]["spec"]
    assert dep["spec"]["replicas"] == 1
    assert pod["initContainers"][0]["image"] == "statefn:1"
    assert "--partitions" in pod["initContainers"][0]["command"]
    assert pod["initContainers"][0]["command"][pod["initContainers"][0]["command"].index("--partitions") + 1] == "16"
