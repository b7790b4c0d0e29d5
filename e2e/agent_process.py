"""The kubelet half that runs things: a pod's containers as local process groups, probes, restarts, pod status.

The API half (``e2e.agent``) feeds pod objects in and patches the status this module computes. Every container is
a process group of its own so a pod's whole tree can be signalled; ``PR_SET_PDEATHSIG`` makes sure nothing
outlives an agent that dies without cleaning up.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent  # the checkout's venv: what the `statefn` image "contains"
HOST_IP = "127.0.0.1"
LOOPBACK = re.compile(r"\b(127\.0\.0\.1|localhost)\b")
VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
Obj = dict[str, Any]


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def is_statefn_image(image: str) -> bool:
    """The contract: any image whose repository's last path segment is ``statefn`` is this checkout."""
    return image.split("@")[0].rsplit("/", 1)[-1].split(":")[0] == "statefn"


def expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's ``$(VAR)`` expansion: known names are replaced, ``$$`` escapes, unknown refs stay verbatim."""
    return VAR_REF.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it if the agent dies (no orphans after a crashed test run)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


async def check(probe: Obj, ports: dict[str, int], pod_ip: str, env: dict[str, str]) -> bool:
    """One probe attempt (httpGet, tcpSocket, exec) within the probe's timeoutSeconds."""
    timeout = probe.get("timeoutSeconds", 1)

    def port_of(spec: Obj) -> int:
        port = spec["port"]
        return int(port) if isinstance(port, int) or str(port).isdigit() else ports[port]

    try:
        if "exec" in probe:
            proc = await asyncio.create_subprocess_exec(*probe["exec"]["command"], env=env, cwd=ROOT,
                                                        stdout=asyncio.subprocess.DEVNULL,
                                                        stderr=asyncio.subprocess.DEVNULL)
            try:
                return await asyncio.wait_for(proc.wait(), timeout) == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        spec = probe.get("httpGet") or probe["tcpSocket"]
        host = spec.get("host") or pod_ip
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port_of(spec)), timeout)
        try:
            if "tcpSocket" in probe:
                return True
            headers = "".join(f"{h['name']}: {h['value']}\r\n" for h in spec.get("httpHeaders", []))
            writer.write(f"GET {spec.get('path', '/')} HTTP/1.1\r\nHost: {host}:{port_of(spec)}\r\n"
                         f"User-Agent: kube-probe/1.33\r\nConnection: close\r\n{headers}\r\n".encode())
            line = await asyncio.wait_for(reader.readline(), timeout)
            parts = line.split()
            return len(parts) >= 2 and 200 <= int(parts[1]) < 400
        finally:
            writer.close()
    except (OSError, TimeoutError, ValueError, KeyError):
        return False


class Container:
    """One container: spawn, probe, restart per policy, and the containerStatus that results."""

    def __init__(self, pod: Pod, spec: Obj, policy: str, kind: str) -> None:
        self.pod, self.spec, self.policy, self.kind = pod, spec, policy, kind  # kind: init | sidecar | main
        self.name: str = spec["name"]
        self.restart_count = 0
        self.ready = self.started_ok = False
        self.state: Obj = {"waiting": {"reason": "PodInitializing" if kind == "main" else "ContainerCreating"}}
        self.last_state: Obj = {}
        self.exit_code: int | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.started = asyncio.Event()  # running and past its startupProbe: the next init step may proceed
        self.stopping = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.ports = {p["name"]: p["containerPort"] for p in spec.get("ports", []) if "name" in p}

    def changed(self) -> None:
        self.pod.on_change()

    def launch(self) -> asyncio.Task[None]:
        self.task = asyncio.create_task(self.supervise(), name=f"{self.pod.key}/{self.name}")
        return self.task

    def argv_env(self) -> tuple[list[str], dict[str, str]]:
        pod = self.pod
        env = {"PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
               "HOME": os.environ.get("HOME", "/tmp"), "HOSTNAME": pod.name, "PYTHONUNBUFFERED": "1"}
        for key in ("LANG", "LC_ALL", "TZ", "TMPDIR"):
            if key in os.environ:
                env[key] = os.environ[key]
        env.update(pod.runtime_env)
        for var in self.spec.get("env", []):
            if "value" in var:
                env[var["name"]] = pod.loopback(expand(var["value"], env))
            elif "fieldRef" in var.get("valueFrom", {}):
                env[var["name"]] = pod.field(var["valueFrom"]["fieldRef"]["fieldPath"])
            else:  # secret/configMap refs were resolved by the API side into pod.resolved
                env[var["name"]] = pod.resolved.get((self.name, var["name"]), "")
        argv = [pod.loopback(expand(a, env)) for a in (self.spec.get("command") or ["statefn"])]
        return argv + [pod.loopback(expand(a, env)) for a in self.spec.get("args", [])], env

    async def supervise(self) -> None:
        """Run until the process exits for good under the restart policy (or the pod stops)."""
        image = self.spec.get("image", "")
        if not is_statefn_image(image):
            self.state = {"waiting": {"reason": "ErrImagePull", "message": f'image "{image}" is not a statefn '
                                      "image: the e2e agent only runs this checkout (…/statefn:TAG)"}}
            self.changed()
            await self.stopping.wait()
            return
        while not self.stopping.is_set():
            argv, env = self.argv_env()
            started_at = now()
            log = os.open(self.pod.workdir / f"{self.pod.ns}_{self.pod.name}_{self.name}.log",
                          os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *argv, env=env, cwd=ROOT, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                    start_new_session=True, preexec_fn=_die_with_parent)
            except OSError as e:
                os.close(log)
                code, reason, message = 128, "StartError", f"failed to start {argv[0]!r}: {e}"
            else:
                os.close(log)
                self.state = {"running": {"startedAt": started_at}}
                if self.stopping.is_set():  # stop() raced the spawn
                    self.send(signal.SIGTERM)
                probes = [asyncio.create_task(self.probe_loop(env))]
                self.changed()
                rc = await self.proc.wait()
                for t in probes:
                    t.cancel()
                code = 128 - rc if rc < 0 else rc
                reason, message = ("Completed" if code == 0 else "Error"), ""
            self.exit_code, self.ready, self.started_ok = code, False, False
            self.started.clear()
            term = {"exitCode": code, "reason": reason, "startedAt": started_at, "finishedAt": now(),
                    "containerID": self.container_id()} | ({"message": message} if message else {})
            self.state = {"terminated": term}
            if self.stopping.is_set() or self.policy == "Never" or (self.policy == "OnFailure" and code == 0):
                self.changed()
                return
            backoff = min(0.5 * 2 ** min(self.restart_count, 4), 5.0)
            self.last_state, self.restart_count = {"terminated": term}, self.restart_count + 1
            self.state = {"waiting": {"reason": "CrashLoopBackOff",
                                      "message": f"back-off {backoff}s restarting failed container"}}
            self.changed()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), backoff)

    def container_id(self) -> str:
        return f"statefn-agent://{self.pod.uid}/{self.name}/{self.restart_count}"

    async def probe_loop(self, env: dict[str, str]) -> None:
        """startupProbe gates the others; readiness sets ready; liveness and startup failures restart."""
        spec = self.spec
        if "startupProbe" in spec and not await self.probe(spec["startupProbe"], env, "startup"):
            return await self.signal_restart()
        self.started_ok = True
        self.started.set()
        self.ready = "readinessProbe" not in spec
        self.changed()
        tasks = [asyncio.create_task(self.probe(spec[k], env, k)) for k in ("readinessProbe", "livenessProbe")
                 if k in spec]
        try:
            if tasks:  # only liveness ever finishes (having failed): readiness runs until cancelled
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                await self.signal_restart()
        finally:
            for t in tasks:
                t.cancel()

    async def probe(self, probe: Obj, env: dict[str, str], kind: str) -> bool:
        """Probe every periodSeconds; startup returns its verdict, liveness returns False when it fails,
        readiness runs forever flipping ``ready``."""
        await asyncio.sleep(probe.get("initialDelaySeconds", 0))
        ok_run = fail_run = 0
        while True:
            ok = await check(probe, self.ports, self.pod.ip, env)
            ok_run, fail_run = (ok_run + 1, 0) if ok else (0, fail_run + 1)
            if ok_run >= probe.get("successThreshold", 1):
                if kind == "startup":
                    return True
                if kind == "readinessProbe" and not self.ready:
                    self.ready = True
                    self.changed()
            if fail_run >= probe.get("failureThreshold", 3):
                if kind != "readinessProbe":
                    return False
                if self.ready:
                    self.ready = False
                    self.changed()
            await asyncio.sleep(probe.get("periodSeconds", 10))

    async def signal_restart(self) -> None:
        self.send(signal.SIGTERM)
        await asyncio.sleep(self.pod.grace())
        self.send(signal.SIGKILL)

    def send(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    async def stop(self, deadline: float) -> None:
        """SIGTERM, then SIGKILL at the deadline; no restarts after this."""
        self.stopping.set()
        self.send(signal.SIGTERM)
        if self.task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self.task), max(deadline - time.monotonic(), 0))
            except TimeoutError:
                self.send(signal.SIGKILL)
                await self.task

    def status(self) -> Obj:
        running = "running" in self.state
        out = {"name": self.name, "image": self.spec.get("image", ""), "restartCount": self.restart_count,
               "ready": self.ready if self.kind != "init" else self.exit_code == 0 and not running,
               "started": running and self.started_ok, "state": self.state,
               "imageID": f"statefn-agent://{self.spec.get('image', '')}" if is_statefn_image(
                   self.spec.get("image", "")) else "", "lastState": self.last_state}
        if running or "terminated" in self.state:
            out["containerID"] = self.container_id()
        return out


class Pod:
    """One pod: the kubelet's start sequence (init, native sidecars, main) and the status it reports."""

    def __init__(self, obj: Obj, ip: str, workdir: Path, on_change: Callable[[], None]) -> None:
        self.obj, self.ip, self.workdir, self.on_change = obj, ip, workdir, on_change
        meta, spec = obj["metadata"], obj["spec"]
        self.name, self.ns, self.uid = meta["name"], meta["namespace"], meta["uid"]
        self.key = f"{self.ns}/{self.name}"
        self.start_time = now()
        self.resolved: dict[tuple[str, str], str] = {}
        self.runtime_env: dict[str, str] = {}  # what the runtime adds for every container (the SA's KUBECONFIG)
        policy = spec.get("restartPolicy", "Always")
        self.inits = [Container(self, c, "Always" if c.get("restartPolicy") == "Always" else
                                ("Never" if policy == "Never" else "OnFailure"),
                                "sidecar" if c.get("restartPolicy") == "Always" else "init")
                      for c in spec.get("initContainers", [])]
        self.mains = [Container(self, c, policy, "main") for c in spec.get("containers", [])]
        self.initialized = self.init_failed = self.stopped = False
        self.task: asyncio.Task[None] | None = None

    def loopback(self, text: str) -> str:
        """Loopback is private to a pod in Kubernetes: emulate it with the pod's own 127.x.y.z address."""
        return text if self.obj["spec"].get("hostNetwork") else LOOPBACK.sub(self.ip, text)

    def field(self, path: str) -> str:
        meta, spec = self.obj["metadata"], self.obj["spec"]
        if m := re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path):
            return str(meta.get(m.group(1), {}).get(m.group(2), ""))
        return {"metadata.name": self.name, "metadata.namespace": self.ns, "metadata.uid": self.uid,
                "spec.nodeName": spec.get("nodeName", ""), "spec.serviceAccountName":
                spec.get("serviceAccountName", ""), "status.podIP": self.ip, "status.podIPs": self.ip,
                "status.hostIP": HOST_IP, "status.hostIPs": HOST_IP}.get(path, "")

    def grace(self) -> float:
        return float(self.obj["spec"].get("terminationGracePeriodSeconds", 30))

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name=self.key)

    async def run(self) -> None:
        self.on_change()
        for c in self.inits:
            c.launch()
            if c.kind == "sidecar":
                await c.started.wait()
            else:
                assert c.task is not None
                await asyncio.shield(c.task)  # a cancelled start sequence must not cancel the supervisor
                if c.exit_code != 0:  # only reached under restartPolicy Never: the pod has failed
                    self.init_failed = True
                    self.on_change()
                    return
        self.initialized = True
        for c in self.mains:
            c.launch()
        self.on_change()

    async def shutdown(self, grace: float) -> None:
        """Main containers (and running init containers) first, then native sidecars in reverse order."""
        deadline = time.monotonic() + grace
        if self.task is not None:
            self.task.cancel()
        first = [c for c in self.inits if c.kind == "init"] + self.mains
        await asyncio.gather(*(c.stop(deadline) for c in first))
        for c in reversed([c for c in self.inits if c.kind == "sidecar"]):
            await c.stop(deadline)
        self.stopped = True
        self.on_change()

    def kill(self) -> None:
        for c in [*self.inits, *self.mains]:
            c.stopping.set()
            c.send(signal.SIGKILL)
        if self.task is not None:
            self.task.cancel()

    def phase(self) -> str:
        if self.init_failed:
            return "Failed"
        if not self.initialized and not self.stopped:
            return "Pending"
        states = [c.state for c in self.mains]
        if any("running" in s for s in states) and not self.stopped:
            return "Running"
        if any("waiting" in s and not c.last_state for s, c in zip(states, self.mains, strict=True)):
            return "Failed" if self.stopped else "Pending"
        if self.stopped or all("terminated" in s for s in states):
            return "Succeeded" if all(c.exit_code == 0 for c in self.mains) else "Failed"
        return "Running"

    def status(self, previous: Obj) -> Obj:
        """The whole status, keeping fields owned by others (qosClass, scheduler's conditions)."""
        phase = self.phase()
        sidecars = [c for c in self.inits if c.kind == "sidecar"]
        pending_init = [c.name for c in self.inits if not (c.started_ok if c.kind == "sidecar" else
                                                           c.exit_code == 0 and "terminated" in c.state)]
        unready = [c.name for c in [*sidecars, *self.mains] if not c.ready]
        terminal = phase in ("Succeeded", "Failed")
        gates = {g["conditionType"] for g in self.obj["spec"].get("readinessGates", [])}
        old = {c["type"]: c for c in previous.get("conditions", [])}
        gates_ok = all(old.get(g, {}).get("status") == "True" for g in gates)

        def cond(kind: str, ok: bool, reason: str = "", message: str = "") -> Obj:
            status = "True" if ok else "False"
            prev = old.get(kind, {})
            when = prev["lastTransitionTime"] if prev.get("status") == status and "lastTransitionTime" in prev \
                else now()
            return {"type": kind, "status": status, "lastProbeTime": None, "lastTransitionTime": when} | (
                {} if ok else {"reason": reason, "message": message})

        ours = [cond("PodReadyToStartContainers", not self.stopped),
                cond("Initialized", not pending_init or self.initialized, "ContainersNotInitialized",
                     f"containers with incomplete status: [{' '.join(pending_init)}]"),
                cond("ContainersReady", not unready and not terminal, "PodCompleted" if terminal else
                     "ContainersNotReady", f"containers with unready status: [{' '.join(unready)}]"),
                cond("Ready", not unready and not terminal and gates_ok, "PodCompleted" if terminal else
                     "ContainersNotReady", f"containers with unready status: [{' '.join(unready)}]")]
        names = {c["type"] for c in ours}
        return {**previous, "phase": phase, "hostIP": HOST_IP, "hostIPs": [{"ip": HOST_IP}], "podIP": self.ip,
                "podIPs": [{"ip": self.ip}], "startTime": self.start_time,
                "conditions": [c for c in previous.get("conditions", []) if c["type"] not in names] + ours,
                "initContainerStatuses": [c.status() for c in self.inits],
                "containerStatuses": [c.status() for c in self.mains]}
