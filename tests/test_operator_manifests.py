"""The pod template a StatefulFunction becomes (no cluster needed; e2e checks admission)."""

from __future__ import annotations

from typing import Any

import pytest

import statefn
from statefn_operator import manifests, settings

BODY: dict[str, Any] = {
    "apiVersion": "statefn.dev/v1alpha1", "kind": "StatefulFunction",
    "metadata": {"name": "counter", "namespace": "shop", "uid": "u-1", "generation": 3},
    "spec": {"image": "registry.local/shop:1.2", "app": "shop.app:app", "partitions": 8,
             "maxStateBytes": 65536, "scaling": {"minReplicas": 2, "maxReplicas": 4},
             "env": [{"name": "MODE", "value": "prod"}], "resources": {"limits": {"memory": "256Mi"}}},
}
SETTINGS = settings.Settings(nats_url="nats://nats:4222", etcd_endpoint="etcd:2379")


def test_deployment_runs_function_and_native_sidecar() -> None:
    dep = manifests.deployment(BODY, SETTINGS, 2)
    assert dep["metadata"]["name"] == "sfn-counter" and dep["metadata"]["namespace"] == "shop"
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    (function,) = pod["containers"]
    (sidecar,) = pod["initContainers"]
    assert function["command"] == ["statefn", "serve", "shop.app:app", "--host", "127.0.0.1", "--port", "9000"]
    assert function["ports"] == [{"name": "function", "containerPort": 9000}]
    assert function["env"] == [{"name": "MODE", "value": "prod"}]
    assert function["resources"] == {"limits": {"memory": "256Mi"}}
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == "registry.local/shop:1.2"
    assert sidecar["command"] == ["statefn", "sidecar", "--remote", "http://127.0.0.1:9000",
                                  "--function", "shop/counter", "--health-host", "$(POD_IP)", "--health-port", "8081",
                                  "--partitions", "8", "--max-attempts", "5", "--max-state-bytes", "65536"]
    assert {e["name"]: e.get("value") for e in sidecar["env"]} == {
        "POD_IP": None, "STATEFN_NATS": "nats://nats:4222", "STATEFN_ETCD": "etcd:2379", "STATEFN_MEMBER_ID": None}
    assert sidecar["env"][0]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert pod["serviceAccountName"] == "sfn-counter" and pod["automountServiceAccountToken"] is False


def test_the_spec_handler_timeout_reaches_the_sidecar() -> None:
    body = {**BODY, "spec": {**BODY["spec"], "handlerTimeoutSeconds": 2.5}}  # type: ignore[dict-item]
    (sidecar,) = manifests.deployment(body, SETTINGS, 1)["spec"]["template"]["spec"]["initContainers"]
    assert sidecar["command"][-2:] == ["--handler-timeout", "2.5"]


def test_pod_template_is_restricted() -> None:
    pod = manifests.deployment(BODY, SETTINGS, 2)["spec"]["template"]["spec"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    for c in pod["containers"] + pod["initContainers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["runAsNonRoot"] is True and sc["runAsUser"] > 0
        assert sc["capabilities"] == {"drop": ["ALL"]} and sc["readOnlyRootFilesystem"] is True
    assert all("hostPath" not in v for v in pod["volumes"])


def test_labels_and_immutable_selector() -> None:
    dep = manifests.deployment(BODY, SETTINGS, 2)
    assert dep["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/instance": "sfn-counter", "statefn.dev/function": "shop.counter"}
    assert dep["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "function"
    assert manifests.selector_string(BODY) == "app.kubernetes.io/instance=sfn-counter,statefn.dev/function=shop.counter"
    sa = manifests.service_account(BODY)
    assert sa["automountServiceAccountToken"] is False and sa["metadata"]["name"] == "sfn-counter"


def test_defaults_when_optional_fields_are_absent() -> None:
    body = {"metadata": {"name": "c", "namespace": "d"}, "spec": {"image": "i", "app": "m:a"}}
    dep = manifests.deployment(body, settings.Settings(nats_url="n", etcd_endpoint="e", sidecar_image="statefn:1"), 1)
    pod = dep["spec"]["template"]["spec"]
    assert dep["spec"]["replicas"] == 1
    assert "ownerReferences" not in dep["metadata"]  # no uid: not created by the API server yet
    assert pod["initContainers"][0]["image"] == "statefn:1"
    assert "--partitions" in pod["initContainers"][0]["command"]
    assert pod["initContainers"][0]["command"][pod["initContainers"][0]["command"].index("--partitions") + 1] == "16"


def test_owned_by_the_function_and_named_by_spec_function() -> None:
    body = {**BODY, "spec": {**BODY["spec"], "function": "demo/counter"}}
    dep = manifests.deployment(body, SETTINGS, 0)
    assert dep["spec"]["replicas"] == 0
    (owner,) = dep["metadata"]["ownerReferences"]
    assert owner == {"apiVersion": "statefn.dev/v1alpha1", "kind": "StatefulFunction", "name": "counter",
                     "uid": "u-1", "controller": True, "blockOwnerDeletion": True}
    assert manifests.service_account(body)["metadata"]["ownerReferences"] == [owner]
    command = dep["spec"]["template"]["spec"]["initContainers"][0]["command"]
    assert command[command.index("--function") + 1] == "demo/counter"


def test_an_invalid_function_type_is_refused_with_the_rule() -> None:
    body = {**BODY, "spec": {**BODY["spec"], "function": "Demo_Counter"}}
    with pytest.raises(statefn.StatefnError, match="expected 'namespace/name'"):
        manifests.function_type(body)


def test_tracing_settings_reach_the_sidecar_named_after_the_function() -> None:
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_TRACES_SAMPLER": "parentbased_always_on",
               "OTEL_SERVICE_NAME": "statefn-operator", "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod",
               "PATH": "/usr/bin"}
    traced = settings.Settings(nats_url="nats://nats:4222", etcd_endpoint="etcd:2379",
                               otel_env=settings.Settings.otel_env_of(environ))
    pod = manifests.deployment(BODY, traced, 1)["spec"]["template"]["spec"]
    (sidecar,), (function,) = pod["initContainers"], pod["containers"]
    for container in (sidecar, function):  # the handlers' own spans go where the sidecar's go
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert {k: v for k, v in env.items() if k.startswith("OTEL_")} == {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_TRACES_SAMPLER": "parentbased_always_on",
            "OTEL_SERVICE_NAME": "shop/counter",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,k8s.pod.name=$(POD_NAME),k8s.namespace.name=shop"}
        # $(POD_NAME) expands only if that variable comes first.
        names = [e["name"] for e in container["env"]]
        assert names.index("POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES")
    assert function["env"][-1] == {"name": "MODE", "value": "prod"}  # the user's own env last: it can override
    untraced = manifests.deployment(BODY, SETTINGS, 1)["spec"]["template"]["spec"]
    for container in (*untraced["initContainers"], *untraced["containers"]):
        assert not [e for e in container["env"] if e["name"].startswith("OTEL_") or e["name"] == "POD_NAME"]
