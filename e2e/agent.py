"""A stand-in kubelet for e2e tests: a real Node whose pods' containers run as local processes of this checkout.

Run as ``python -m e2e.agent --kubeconfig K --node NAME --workdir DIR``. Everything it talks to (API server,
scheduler, controllers) is real; only the container runtime is emulated (see ``e2e.agent_process`` and the pod
contract in the docs: ``statefn`` images, one 127.x.y.z address per pod). This module is the API side: node
registration and heartbeats, the pod list/watch, status patches and the deletion hand-shake.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import platform
import signal
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from e2e.agent_process import HOST_IP, Obj, Pod, now

log = logging.getLogger("statefn.e2e.agent")
HEARTBEAT = 10.0
LEASE_NS = "kube-node-lease"
VERSION = "v1.33.13"


class Agent:
    """One node: registers itself, keeps its lease fresh, runs the pods bound to it and reports their status."""

    def __init__(self, api: client.ApiClient, node: str, workdir: Path, ip_block: int, kubeconfig: Path) -> None:
        self.kubeconfig = json.loads(kubeconfig.read_text())  # its cluster entry is what pods are pointed at
        self.core, self.coord = client.CoreV1Api(api), client.CoordinationV1Api(api)
        self.node, self.workdir, self.ip_block = node, workdir, ip_block
        self.since = now()
        self.pods: dict[str, Pod] = {}
        self.tasks: dict[str, list[asyncio.Task[Any]]] = {}
        self.dirty: dict[str, asyncio.Event] = {}
        self.terminating: set[str] = set()
        self.background: set[asyncio.Task[None]] = set()  # terminations outlive vanished(): they finish a delete
        self.ips = 0

    def allocate_ip(self) -> str:
        """Never 127.0.0.1 and never reused during a run (a dying process may still hold its port)."""
        n, self.ips = self.ips, self.ips + 1
        return f"127.{self.ip_block}.{n // 254 % 256}.{n % 254 + 1}"

    # --- the node -------------------------------------------------------------------------------------------
    def node_status(self) -> Obj:
        resources = {"cpu": "8", "memory": "16Gi", "pods": "110", "ephemeral-storage": "100Gi"}
        beat = now()

        def cond(kind: str, status: str, reason: str) -> Obj:
            return {"type": kind, "status": status, "reason": reason, "message": f"statefn e2e agent: {reason}",
                    "lastHeartbeatTime": beat, "lastTransitionTime": self.since}

        return {"capacity": resources, "allocatable": resources,
                "conditions": [cond("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                               cond("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                               cond("PIDPressure", "False", "KubeletHasSufficientPID"),
                               cond("Ready", "True", "KubeletReady")],
                "addresses": [{"type": "InternalIP", "address": HOST_IP}, {"type": "Hostname", "address": self.node}],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
                "nodeInfo": {"machineID": self.node, "systemUUID": self.node, "bootID": self.since,
                             "kernelVersion": platform.release(), "osImage": "statefn e2e agent",
                             "containerRuntimeVersion": "statefn-agent://0", "kubeletVersion": VERSION,
                             "kubeProxyVersion": VERSION, "operatingSystem": "linux", "architecture": "amd64"}}

    async def register(self) -> None:
        labels = {"kubernetes.io/hostname": self.node, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}
        with contextlib.suppress(ApiException):  # 409: a restarted agent re-uses its Node
            await self.core.create_node({"metadata": {"name": self.node, "labels": labels}, "spec": {},
                                         "status": self.node_status()})
        await self.heartbeat()

    async def heartbeat(self) -> None:
        """What the node lifecycle controller looks at: the Lease's renewTime and the Ready condition."""
        await self.core.patch_node_status(self.node, {"status": self.node_status()})
        renew = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        spec = {"holderIdentity": self.node, "leaseDurationSeconds": 40, "renewTime": renew}
        try:
            await self.coord.patch_namespaced_lease(self.node, LEASE_NS, {"spec": spec})
        except ApiException as e:
            if e.status != 404:
                raise
            node = await self.core.read_node(self.node)
            owner = {"apiVersion": "v1", "kind": "Node", "name": self.node, "uid": node.metadata.uid}
            await self.coord.create_namespaced_lease(LEASE_NS, {"metadata": {"name": self.node, "ownerReferences":
                                                                             [owner]}, "spec": spec})

    async def heartbeats(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            try:
                await self.heartbeat()
            except (ApiException, aiohttp.ClientError, TimeoutError) as e:
                log.warning("heartbeat failed: %s", e)

    # --- pods -----------------------------------------------------------------------------------------------
    async def watch_pods(self) -> None:
        """List then watch pods bound here; a relist notices pods deleted while the watch was down."""
        selector = f"spec.nodeName={self.node}"
        while True:
            try:
                resp = await self.core.list_pod_for_all_namespaces(field_selector=selector, _preload_content=False)
                listing = json.loads(await resp.read())
                items = {p["metadata"]["uid"]: p for p in listing["items"]}
                for uid in [u for u in self.pods if u not in items]:
                    self.vanished(uid)
                for obj in items.values():
                    await self.observe(obj)
                async with watch.Watch() as w:
                    async for ev in w.stream(self.core.list_pod_for_all_namespaces, field_selector=selector,
                                             resource_version=listing["metadata"]["resourceVersion"],
                                             timeout_seconds=300, allow_watch_bookmarks=True):
                        if ev["type"] == "DELETED":
                            self.vanished(ev["raw_object"]["metadata"]["uid"])
                        elif ev["type"] in ("ADDED", "MODIFIED"):
                            await self.observe(ev["raw_object"])
            except (ApiException, aiohttp.ClientError, TimeoutError, ValueError) as e:
                if not (isinstance(e, ApiException) and e.status == 410):
                    log.warning("pod watch failed, relisting: %s", e)
                    await asyncio.sleep(1)

    async def observe(self, obj: Obj) -> None:
        meta = obj["metadata"]
        uid = meta["uid"]
        pod = self.pods.get(uid)
        if pod is None:
            if meta.get("deletionTimestamp"):  # bound, never started by us (e.g. agent restart): just let it go
                await self.delete(meta["name"], meta["namespace"], uid)
                return
            if obj.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                return
            ip = "127.0.0.1" if obj["spec"].get("hostNetwork") else self.allocate_ip()
            dirty = self.dirty[uid] = asyncio.Event()
            pod = self.pods[uid] = Pod(obj, ip, self.workdir, dirty.set)
            log.info("starting pod %s (uid %s) at %s", pod.key, uid, ip)
            await self.resolve_env(pod)
            await self.mount_service_account(pod)
            pod.start()
            self.tasks[uid] = [asyncio.create_task(self.report(pod, dirty))]
        pod.obj = obj
        if meta.get("deletionTimestamp") and uid not in self.terminating:
            self.terminating.add(uid)
            grace = meta.get("deletionGracePeriodSeconds")
            task = asyncio.create_task(self.terminate(pod, pod.grace() if grace is None else grace))
            self.background.add(task)
            task.add_done_callback(self.background.discard)

    async def resolve_env(self, pod: Pod) -> None:
        """Env from ConfigMap/Secret keys, read once at start as the kubelet does (missing optional keys: '')."""
        spec = pod.obj["spec"]
        for c in [*spec.get("initContainers", []), *spec.get("containers", [])]:
            for var in c.get("env", []):
                ref = var.get("valueFrom", {})
                try:
                    if "configMapKeyRef" in ref:
                        cm = await self.core.read_namespaced_config_map(ref["configMapKeyRef"]["name"], pod.ns)
                        pod.resolved[(c["name"], var["name"])] = (cm.data or {}).get(ref["configMapKeyRef"]["key"], "")
                    elif "secretKeyRef" in ref:
                        secret = await self.core.read_namespaced_secret(ref["secretKeyRef"]["name"], pod.ns)
                        raw = (secret.data or {}).get(ref["secretKeyRef"]["key"])
                        pod.resolved[(c["name"], var["name"])] = base64.b64decode(raw).decode() if raw else ""
                except ApiException as e:
                    log.warning("pod %s: env %s unresolved: %s", pod.key, var["name"], e.reason)

    async def mount_service_account(self, pod: Pod) -> None:
        """Stand in for the projected ``kube-api-access`` volume: a pod-bound token in a per-pod kubeconfig.

        The ServiceAccount admission plugin adds that volume only when the token is to be mounted, so its presence is
        the kubelet's cue, as here. Processes cannot see /var/run/secrets, so containers get ``KUBECONFIG`` instead
        and talk to the API server as their ServiceAccount (its RBAC, not the admin's, decides what they may do).
        """
        spec = pod.obj["spec"]
        if not any("serviceAccountToken" in source for volume in spec.get("volumes", [])
                   for source in volume.get("projected", {}).get("sources", [])):
            return
        account = spec.get("serviceAccountName") or "default"
        bound = {"apiVersion": "v1", "kind": "Pod", "name": pod.name, "uid": pod.uid}
        request = {"spec": {"expirationSeconds": 86400, "boundObjectRef": bound}}
        try:
            token = await self.core.create_namespaced_service_account_token(account, pod.ns, request)
        except ApiException as e:
            log.warning("pod %s: no token for ServiceAccount %s: %s", pod.key, account, e.reason)
            return
        cluster = self.kubeconfig["clusters"][0]
        path = self.workdir / pod.uid / "kubeconfig"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "pod", "clusters": [cluster],
            "users": [{"name": account, "user": {"token": token.status.token}}],
            "contexts": [{"name": "pod", "context": {"cluster": cluster["name"], "user": account,
                                                      "namespace": pod.ns}}]}))
        pod.runtime_env["KUBECONFIG"] = str(path)

    async def report(self, pod: Pod, dirty: asyncio.Event) -> None:
        """Coalesce changes and replace the whole status (a JSON patch: no stale keys, no conflicts)."""
        last: Obj | None = None
        while True:
            await dirty.wait()
            await asyncio.sleep(0.05)
            dirty.clear()
            if (status := pod.status(last or pod.obj.get("status", {}))) == last:
                continue
            try:
                await self.core.patch_namespaced_pod_status(pod.name, pod.ns, [
                    {"op": "add", "path": "/status", "value": status}])
                last = status
            except ApiException as e:
                if e.status == 404:
                    return
                log.warning("status of %s: %s %s", pod.key, e.status, e.body)
                await asyncio.sleep(0.5)
                dirty.set()
            except (aiohttp.ClientError, TimeoutError) as e:
                log.warning("status of %s: %s", pod.key, e)
                await asyncio.sleep(0.5)
                dirty.set()

    async def terminate(self, pod: Pod, grace: float) -> None:
        """Graceful stop within the delete's grace period, a last status, then the final delete (grace 0)."""
        log.info("stopping pod %s within %ss", pod.key, grace)
        await pod.shutdown(grace)
        await asyncio.sleep(0.1)  # let the reporter publish the terminated states
        await self.delete(pod.name, pod.ns, pod.uid)

    async def delete(self, name: str, ns: str, uid: str) -> None:
        with contextlib.suppress(ApiException):  # 404/409: already gone, or a new pod of the same name
            await self.core.delete_namespaced_pod(name, ns, body={"gracePeriodSeconds": 0,
                                                                  "preconditions": {"uid": uid}})

    def vanished(self, uid: str) -> None:
        """Gone from the API (force delete, or our own final delete): nothing of it may keep running."""
        pod = self.pods.pop(uid, None)
        if pod is None:
            return
        pod.kill()
        self.dirty.pop(uid, None)
        self.terminating.discard(uid)
        for t in self.tasks.pop(uid, []):
            t.cancel()

    def kill_all(self) -> None:
        for pod in self.pods.values():
            pod.kill()


async def run(args: argparse.Namespace) -> None:
    api = await config.new_client_from_config(config_file=args.kubeconfig)
    args.workdir.mkdir(parents=True, exist_ok=True)
    block = args.ip_block or 10 + zlib.crc32(args.node.encode()) % 240
    agent = Agent(api, args.node, args.workdir, block, Path(args.kubeconfig))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await agent.register()
        log.info("node %s registered", args.node)
        workers = [asyncio.create_task(agent.heartbeats()), asyncio.create_task(agent.watch_pods())]
        await asyncio.wait([asyncio.create_task(stop.wait()), *workers], return_when=asyncio.FIRST_COMPLETED)
        for w in workers:
            if w.done() and w.exception():
                log.error("agent worker died", exc_info=w.exception())
            w.cancel()
    finally:
        agent.kill_all()
        await api.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--ip-block", type=int, default=0, help="pods get 127.BLOCK.x.y (default: from the name)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
