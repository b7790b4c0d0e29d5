"""What a StatefulFunction becomes: pure builders of its ServiceAccount and Deployment.

Pure functions of the custom resource and the operator's settings, so they are unit-tested
without a cluster and the kopf handlers stay thin. The pod template meets Pod Security
"restricted": an injected sidecar that failed admission would break every user's pods.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from statefn import _constants

FUNCTION_PORT = 9000
HEALTH_PORT = 8081
RUN_AS_USER = 65532  # "nonroot" in distroless-style images


@dataclasses.dataclass(frozen=True)
class Settings:
    """Where the data plane's services are, as the operator was told (chart values)."""

    nats_url: str
    etcd_endpoint: str
    sidecar_image: str | None = None  # None: the function's own image also runs the sidecar


def name_of(body: dict[str, Any]) -> str:
    return f"sfn-{body['metadata']['name']}"


def labels(body: dict[str, Any]) -> dict[str, str]:
    meta = body["metadata"]
    return {
        "app.kubernetes.io/name": meta["name"],
        "app.kubernetes.io/instance": name_of(body),
        _constants.LABEL_COMPONENT: "function",
        "app.kubernetes.io/managed-by": "statefn-operator",
        _constants.LABEL_FUNCTION: f"{meta['namespace']}.{meta['name']}",
    }


def selector(body: dict[str, Any]) -> dict[str, str]:
    """Selectors are immutable: only the identity labels, never a version."""
    return {k: v for k, v in labels(body).items() if k in ("app.kubernetes.io/instance", _constants.LABEL_FUNCTION)}


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
        "metadata": {"name": name_of(body), "namespace": body["metadata"]["namespace"], "labels": labels(body)},
        # Neither the handlers nor the sidecar talk to the Kubernetes API.
        "automountServiceAccountToken": False,
    }


def deployment(body: dict[str, Any], settings: Settings) -> dict[str, Any]:
    spec = body["spec"]
    meta = body["metadata"]
    scaling = spec.get("scaling", {})
    env = [{"name": e["name"], "value": e.get("value", "")} for e in spec.get("env", [])]
    function = {
        "name": "function",
        "image": spec["image"],
        "command": ["statefn", "serve", spec["app"], "--host", "127.0.0.1", "--port", str(FUNCTION_PORT)],
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
                    "--health-port", str(HEALTH_PORT), "--partitions", str(spec.get("partitions", 16)),
                    "--max-state-bytes", str(spec.get("maxStateBytes", _constants.DEFAULT_MAX_STATE_BYTES))],
        "env": [
            {"name": "STATEFN_NATS", "value": settings.nats_url},
            {"name": "STATEFN_ETCD", "value": settings.etcd_endpoint},
            {"name": "STATEFN_MEMBER_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        "ports": [{"name": "health", "containerPort": HEALTH_PORT}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "health"}, "periodSeconds": 2},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "health"}, "periodSeconds": 10},
        "securityContext": _restricted(),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name_of(body), "namespace": meta["namespace"], "labels": labels(body)},
        "spec": {
            "replicas": scaling.get("minReplicas", 1),
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
