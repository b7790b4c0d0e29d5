"""The test agent behaves like a kubelet towards the real scheduler, controllers and kubectl.

Pods are placed by the real kube-scheduler, Deployments scaled by the real kube-controller-manager; the agent runs
each container as a local process of this checkout (the pod contract in the docs) and reports what it sees.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from e2e import harness

NS = "agent-e2e"
Obj = dict[str, Any]
POD_IP_ENV = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]


@pytest.fixture(scope="module")
def k8s(cluster: harness.ControlPlane, node: str) -> Iterator[harness.ControlPlane]:
    cluster.kubectl("create", "namespace", NS)
    deadline = time.monotonic() + 30  # pods are only admitted once the namespace has its default ServiceAccount
    while cluster.kubectl("get", "serviceaccount", "default", "-n", NS, check=False).returncode != 0:
        assert time.monotonic() < deadline, "no default ServiceAccount"
        time.sleep(0.2)
    yield cluster
    cluster.kubectl("delete", "namespace", NS, "--wait=false")


def web(name: str, image: str = "statefn:dev", port: int = 8000) -> Obj:
    """A pod serving HTTP on its own IP, ready once the server answers."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": {"app": name}},
            "spec": {"terminationGracePeriodSeconds": 5, "containers": [web_container("web", image, port)]}}


def web_container(name: str, image: str, port: int) -> Obj:
    return {"name": name, "image": image, "env": POD_IP_ENV,
            "command": ["python", "-m", "http.server", str(port), "--bind", "$(POD_IP)"],
            "ports": [{"name": "http", "containerPort": port}],
            "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1}}


def apply(k8s: harness.ControlPlane, *objs: Obj) -> None:
    k8s.kubectl("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objs)}))


def get(k8s: harness.ControlPlane, *what: str) -> Obj:
    result: Obj = json.loads(k8s.kubectl("get", "-n", NS, "-o", "json", *what).stdout)
    return result


def until(check: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def answers(ip: str, port: int = 8000) -> bool:
    try:
        with urllib.request.urlopen(f"http://{ip}:{port}/", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def test_pods_get_distinct_ips_become_ready_and_serve(k8s: harness.ControlPlane) -> None:
    apply(k8s, web("web-a"), web("web-b"))
    k8s.kubectl("wait", "-n", NS, "--for=condition=Ready", "--timeout=60s", "pod/web-a", "pod/web-b")
    pods = [get(k8s, "pod", name) for name in ("web-a", "web-b")]
    ips = [p["status"]["podIP"] for p in pods]
    assert len(set(ips)) == 2 and all(ip.startswith("127.") and ip != "127.0.0.1" for ip in ips), ips
    for pod, ip in zip(pods, ips, strict=True):
        assert answers(ip)
        status = pod["status"]
        assert pod["spec"]["nodeName"] == "e2e-node-1" and status["phase"] == "Running"
        assert status["podIPs"] == [{"ip": ip}] and status["hostIP"] == "127.0.0.1" and status["startTime"]
        assert {c["type"]: c["status"] for c in status["conditions"]} == {
            "PodScheduled": "True", "PodReadyToStartContainers": "True", "Initialized": "True",
            "ContainersReady": "True", "Ready": "True"}
        [cs] = status["containerStatuses"]
        assert cs["name"] == "web" and cs["image"] == "statefn:dev" and cs["imageID"]
        assert cs["ready"] and cs["started"] and cs["restartCount"] == 0 and "running" in cs["state"]


def test_a_foreign_image_is_not_pulled(k8s: harness.ControlPlane) -> None:
    apply(k8s, web("foreign", image="docker.io/library/nginx:1.27"))
    waiting = until(lambda: get(k8s, "pod", "foreign")["status"].get("containerStatuses", [{}])[0]
                    .get("state", {}).get("waiting", {}).get("reason") == "ErrImagePull", what="ErrImagePull")
    assert waiting
    status = get(k8s, "pod", "foreign")["status"]
    assert status["phase"] == "Pending" and "statefn" in status["containerStatuses"][0]["state"]["waiting"]["message"]
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "False"


def test_deleting_a_pod_stops_its_processes(k8s: harness.ControlPlane) -> None:
    apply(k8s, web("doomed"))
    k8s.kubectl("wait", "-n", NS, "--for=condition=Ready", "--timeout=60s", "pod/doomed")
    ip = get(k8s, "pod", "doomed")["status"]["podIP"]
    assert answers(ip)
    k8s.kubectl("delete", "-n", NS, "pod", "doomed", "--timeout=30s")  # waits for the agent's final delete
    assert not answers(ip)
    assert k8s.kubectl("get", "-n", NS, "pod", "doomed", check=False).returncode != 0


def test_a_force_deleted_pod_is_killed(k8s: harness.ControlPlane) -> None:
    apply(k8s, web("forced"))
    k8s.kubectl("wait", "-n", NS, "--for=condition=Ready", "--timeout=60s", "pod/forced")
    ip = get(k8s, "pod", "forced")["status"]["podIP"]
    k8s.kubectl("delete", "-n", NS, "pod", "forced", "--grace-period=0", "--force")
    until(lambda: not answers(ip), timeout=10, what="the killed server to stop answering")


def test_init_container_native_sidecar_then_main(k8s: harness.ControlPlane) -> None:
    """Order and gating: init runs to completion, the sidecar must pass its startupProbe, then main starts."""
    sidecar = web_container("side", "statefn:dev", 8001) | {
        "restartPolicy": "Always", "startupProbe": {"tcpSocket": {"port": 8001}, "periodSeconds": 1}}
    main = {"name": "main", "image": "statefn:dev", "env": POD_IP_ENV, "command": [
        "python", "-c", "import urllib.request, os, time; "
        "urllib.request.urlopen('http://' + os.environ['POD_IP'] + ':8001/'); print('sidecar up', flush=True); "
        "time.sleep(3600)"]}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ordered", "namespace": NS},
           "spec": {"terminationGracePeriodSeconds": 5, "containers": [main], "initContainers": [
               {"name": "init", "image": "statefn:dev", "command": ["python", "-c", "print('init done')"]}, sidecar]}}
    apply(k8s, pod)
    k8s.kubectl("wait", "-n", NS, "--for=condition=Ready", "--timeout=60s", "pod/ordered")
    status = get(k8s, "pod", "ordered")["status"]
    init, side = status["initContainerStatuses"]
    assert init["state"]["terminated"]["exitCode"] == 0 and init["state"]["terminated"]["reason"] == "Completed"
    assert "running" in side["state"] and side["started"] and side["ready"]
    [main_status] = status["containerStatuses"]
    assert main_status["restartCount"] == 0 and "running" in main_status["state"]
    assert answers(status["podIP"], 8001)
    k8s.kubectl("delete", "-n", NS, "pod", "ordered", "--timeout=30s")
    assert not answers(status["podIP"], 8001)


def test_exited_containers_are_restarted(k8s: harness.ControlPlane) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "crashy", "namespace": NS},
           "spec": {"containers": [{"name": "c", "image": "statefn:dev", "command": ["python", "-c", "exit(3)"]}]}}
    apply(k8s, pod)
    cs = until(lambda: [c for c in get(k8s, "pod", "crashy")["status"].get("containerStatuses", [])
                        if c["restartCount"] >= 2], what="two restarts")[0]
    assert cs["lastState"]["terminated"]["exitCode"] == 3 and not cs["ready"]
    k8s.kubectl("delete", "-n", NS, "pod", "crashy", "--timeout=30s")


def test_env_expansion_downward_api_and_private_loopback(k8s: harness.ControlPlane) -> None:
    env = [{"name": "ADDR", "value": "localhost:4222"}, {"name": "URL", "value": "nats://$(ADDR)/$$(ADDR)"},
           {"name": "ME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
           {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}}, *POD_IP_ENV]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "envy", "namespace": NS},
           "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "statefn:dev", "env": env,
                                                              "command": ["python", "-c"],
                                                              "args": ["import os, sys; print(sys.argv[1:], "
                                                                       "os.environ['URL'], os.environ['ME'], "
                                                                       "os.environ['SA'], os.getcwd())",
                                                                       "$(ME)", "127.0.0.1:9", "$(NOPE)"]}]}}
    apply(k8s, pod)
    until(lambda: get(k8s, "pod", "envy")["status"].get("phase") == "Succeeded", what="Succeeded")
    ip = get(k8s, "pod", "envy")["status"]["podIP"]
    out = (k8s.workdir / "node-e2e-node-1" / f"{NS}_envy_c.log").read_text().strip()
    assert out == f"['envy', '{ip}:9', '$(NOPE)'] nats://{ip}:4222/$(ADDR) envy default {harness.ROOT}"


def test_a_deployment_scales_through_the_real_controllers(k8s: harness.ControlPlane) -> None:
    dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "fleet", "namespace": NS},
           "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "fleet"}},
                    "template": {"metadata": {"labels": {"app": "fleet"}},
                                 "spec": web("fleet")["spec"]}}}
    apply(k8s, dep)
    k8s.kubectl("rollout", "status", "-n", NS, "deployment/fleet", "--timeout=60s")
    k8s.kubectl("scale", "-n", NS, "deployment/fleet", "--replicas=3")
    k8s.kubectl("rollout", "status", "-n", NS, "deployment/fleet", "--timeout=60s")
    pods = get(k8s, "pods", "-l", "app=fleet")["items"]
    ready = [p for p in pods if not p["metadata"].get("deletionTimestamp")
             and {c["type"]: c["status"] for c in p["status"]["conditions"]}["Ready"] == "True"]
    assert len(ready) == 3
    ips = {p["status"]["podIP"] for p in ready}
    assert len(ips) == 3 and all(answers(ip) for ip in ips)
    assert get(k8s, "deployment", "fleet")["status"]["readyReplicas"] == 3


WHOAMI = """
import asyncio
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

async def main():
    await config.load_kube_config()
    async with client.ApiClient() as api:
        core = client.CoreV1Api(api)
        pods = await core.list_namespaced_pod("agent-e2e")
        print("pods", len(pods.items))
        try:
            await core.list_namespaced_secret("agent-e2e")
            print("secrets allowed")
        except ApiException as e:
            print("secrets", e.status)

asyncio.run(main())
"""


def test_containers_act_as_their_service_account(k8s: harness.ControlPlane) -> None:
    """The token is bound to the pod and its ServiceAccount: RBAC sees the account, not the agent's admin."""
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "pod-reader",
                                                                                         "namespace": NS},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "pod-reader", "namespace": NS},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
               "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": NS}]}
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader", "namespace": NS}}
    container = {"name": "c", "image": "statefn:dev", "command": ["python", "-c", WHOAMI]}
    pods = [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS},
             "spec": {"restartPolicy": "Never", "serviceAccountName": "reader", "containers": [container]} | extra}
            for name, extra in (("whoami", {}), ("tokenless", {"automountServiceAccountToken": False}))]
    apply(k8s, account, role, binding, *pods)
    for name in ("whoami", "tokenless"):
        until(lambda n=name: get(k8s, "pod", n)["status"].get("phase") in ("Succeeded", "Failed"), what=name)
    logs = k8s.workdir / "node-e2e-node-1"
    out = (logs / f"{NS}_whoami_c.log").read_text().split("\n")
    assert out[0].startswith("pods ") and int(out[0].split()[1]) >= 1 and out[1] == "secrets 403", out
    assert get(k8s, "pod", "whoami")["status"]["phase"] == "Succeeded"
    # without a mounted token there is no kubeconfig: the client finds no configuration and the container fails
    assert get(k8s, "pod", "tokenless")["status"]["phase"] == "Failed"
    assert "kube-config" in (logs / f"{NS}_tokenless_c.log").read_text().lower()
