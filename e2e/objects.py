"""Reading objects and waiting on them through kubectl, as a user would check them."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from e2e import harness


def get(cluster: harness.ControlPlane, namespace: str, *what: str) -> dict[str, Any]:
    """The object(s) as JSON, or {} when absent."""
    out = cluster.kubectl("get", "-n", namespace, *what, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def wait_for(check: Callable[[], Any], timeout: float = 30, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.3)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what or check}")


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == type_), {})


def events(cluster: harness.ControlPlane, namespace: str, name: str) -> list[tuple[str, str, str]]:
    items = get(cluster, namespace, "events", "--field-selector", f"involvedObject.name={name}").get("items", [])
    return [(e["type"], e["reason"], e["message"]) for e in items]


# An image the test agent refuses to run (ErrImagePull): for suites about the operator alone, whose Deployments must
# not get running pods even when the session's agent node is up.
NO_PODS_IMAGE = "registry.invalid/not-run:0"


def function(name: str, namespace: str, image: str = "statefn:dev", **spec: Any) -> str:
    """A StatefulFunction manifest running the counter example's app."""
    return json.dumps({"apiVersion": "statefn.dev/v1alpha1", "kind": "StatefulFunction",
                       "metadata": {"name": name, "namespace": namespace},
                       "spec": {"image": image, "app": "examples.counter.app:app", **spec}})
