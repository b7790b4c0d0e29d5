"""What a StatefulFunction becomes: pure builders of its ServiceAccount and Deployment.

Pure functions of the custom resource and the operator's settings, so they are unit-tested
without a cluster and the kopf handlers stay thin. The pod template meets Pod Security
"restricted": an injected sidecar that failed admission would break every user's pods.
"""

from __future__ import annotations

from typing import Any

from statefn_core import constants, layout
from statefn_operator import settings as settings_mod

FUNCTION_PORT = 9000
HEALTH_PORT = 8081
RUN_AS_USER = 65532  # "nonroot" in distroless-style images


def name_of(body: dict[str, Any]) -> str:
    return f"sfn-{body['metadata']['name']}"


def function_type(body: dict[str, Any]) -> layout.FunctionType:
    """spec.function, or the resource's own namespace/name (validated the same way either way)."""
    meta = body["metadata"]
    return layout.FunctionType.parse(body["spec"].get("function") or f"{meta['namespace']}/{meta['name']}")


def owner_reference(body: dict[str, Any]) -> dict[str, Any]:
    """The Deployment and ServiceAccount belong to the StatefulFunction (garbage-collected with it)."""
    return {
        "apiVersion": f"{constants.API_GROUP}/{constants.API_VERSION}",
        "kind": "StatefulFunction",
        "name": body["metadata"]["name"],
        "uid": body["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(body: dict[str, Any]) -> dict[str, Any]:
    meta = {"name": name_of(body), "namespace": body["metadata"]["namespace"], "labels": labels(body)}
    if body["metadata"].get("uid"):
        meta["ownerReferences"] = [owner_reference(body)]
    return meta


def labels(body: dict[str, Any]) -> dict[str, str]:
    meta = body["metadata"]
    return {
        "app.kubernetes.io/name": meta["name"],
        "app.kubernetes.io/instance": name_of(body),
        constants.LABEL_COMPONENT: "function",
        "app.kubernetes.io/managed-by": constants.MANAGED_BY,
        constants.LABEL_FUNCTION: f"{meta['namespace']}.{meta['name']}",
    }


def selector(body: dict[str, Any]) -> dict[str, str]:
    """Selectors are immutable: only the identity labels, never a version."""
    return {k: v for k, v in labels(body).items() if k in ("app.kubernetes.io/instance", constants.LABEL_FUNCTION)}


def selector_string(body: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector(body).items()))


def _restricted() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def service_account(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(body),
        # Neither the handlers nor the sidecar talk to the Kubernetes API.
        "automountServiceAccountToken": False,
    }


def _otel_env(body: dict[str, Any], settings: settings_mod.Settings) -> list[dict[str, Any]]:
    """Tracing for both containers: the operator's OTEL_* settings, named after the function and the pod.

    Nothing when the operator has none: a pod template without OTEL_* traces nothing.
    """
    if not settings.otel_env:
        return []
    forwarded = dict(settings.otel_env)
    ours = f"k8s.pod.name=$(POD_NAME),k8s.namespace.name={body['metadata']['namespace']}"
    given = forwarded.pop("OTEL_RESOURCE_ATTRIBUTES", "")
    return [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            *({"name": k, "value": v} for k, v in sorted(forwarded.items())),
            {"name": "OTEL_SERVICE_NAME", "value": str(function_type(body))},
            {"name": "OTEL_RESOURCE_ATTRIBUTES", "value": f"{given},{ours}" if given else ours}]


def deployment(body: dict[str, Any], settings: settings_mod.Settings, replicas: int) -> dict[str, Any]:
    """The function's Deployment at ``replicas`` (the autoscaler's, not the spec's, decision)."""
    spec = body["spec"]
    # The handlers' own spans go where the sidecar's go (the user's env, after ours, can override).
    env = [*_otel_env(body, settings),
           *({"name": e["name"], "value": e.get("value", "")} for e in spec.get("env", []))]
    pod_ip = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    function = {
        "name": "function",
        # Listens on the pod's loopback only: nothing outside the pod can invoke handlers directly.
        "image": spec["image"],
        "command": ["statefn", "serve", spec["app"], "--host", "127.0.0.1", "--port", str(FUNCTION_PORT)],
        "ports": [{"name": "function", "containerPort": FUNCTION_PORT}],
        "env": env,
        "resources": spec.get("resources", {}),
        "securityContext": _restricted(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    sidecar = {
        "name": "statefn-sidecar",
        "image": settings.sidecar_image or spec["image"],
        # A native sidecar: an init container that keeps running, started before and stopped
        # after the function container, so it can release its partitions on SIGTERM.
        "restartPolicy": "Always",
        "command": ["statefn", "sidecar", "--remote", f"http://127.0.0.1:{FUNCTION_PORT}",
                    "--function", str(function_type(body)),
                    # Probes come from outside the pod, so health listens on the pod's address.
                    "--health-host", "$(POD_IP)", "--health-port", str(HEALTH_PORT),
                    "--partitions", str(spec.get("partitions", constants.DEFAULT_PARTITIONS)),
                    "--max-attempts", str(spec.get("maxAttempts", constants.DEFAULT_MAX_ATTEMPTS)),
                    "--max-state-bytes", str(spec.get("maxStateBytes", constants.DEFAULT_MAX_STATE_BYTES)),
                    *(["--handler-timeout", str(spec["handlerTimeoutSeconds"])]
                      if "handlerTimeoutSeconds" in spec else [])],
        "env": [
            pod_ip,
            {"name": "STATEFN_NATS", "value": settings.nats_url},
            {"name": "STATEFN_ETCD", "value": settings.etcd_endpoint},
            {"name": "STATEFN_MEMBER_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            *_otel_env(body, settings),
        ],
        "ports": [{"name": "health", "containerPort": HEALTH_PORT}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "health"}, "periodSeconds": 2},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "health"}, "periodSeconds": 10},
        "securityContext": _restricted(),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(body),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector(body)},
            "template": {
                "metadata": {"labels": labels(body)},
                "spec": {
                    "serviceAccountName": name_of(body),
                    "automountServiceAccountToken": False,
                    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                    # The sidecar hands its partitions back within this window on SIGTERM.
                    "terminationGracePeriodSeconds": 30,
                    "initContainers": [sidecar],
                    "containers": [function],
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }
