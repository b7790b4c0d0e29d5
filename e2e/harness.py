"""A real Kubernetes control plane for e2e tests: etcd, kube-apiserver, kube-controller-manager, kube-scheduler.

Binaries come from ``scripts/build-k8s.sh`` (built once from the pinned Go modules into a
cache outside the clone). Only the kubelet is missing (``e2e.agent`` stands in for it); nothing here is a mock.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from statefn_sidecar import devservers

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "statefn-e2e-admin-token"


def k8s_bin_dir() -> Path:
    """Build (first time) or find the cached binaries."""
    out = subprocess.run(["bash", str(ROOT / "scripts" / "build-k8s.sh")], check=True, capture_output=True,
                         text=True, timeout=1800)
    return Path(out.stdout.strip().splitlines()[-1])


class ControlPlane:
    def __init__(self, bins: Path) -> None:
        self.bins = bins
        self.workdir = Path(tempfile.mkdtemp(prefix="statefn-k8s-"))
        self.etcd = devservers.EtcdServer(self.workdir / "etcd")
        self.port = devservers.free_port()
        self.apiserver: subprocess.Popen[bytes] | None = None
        self.controllers: dict[str, subprocess.Popen[bytes]] = {}
        self.kubeconfig = self.workdir / "kubeconfig"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> None:
        (self.workdir / "etcd").mkdir()
        self.etcd.start()
        certs = self.workdir / "certs"
        certs.mkdir()
        sa_key, sa_pub = self.workdir / "sa.key", self.workdir / "sa.pub"
        subprocess.run(["openssl", "genrsa", "-out", str(sa_key), "2048"], check=True, capture_output=True)
        subprocess.run(["openssl", "rsa", "-in", str(sa_key), "-pubout", "-out", str(sa_pub)], check=True,
                       capture_output=True)
        tokens = self.workdir / "tokens.csv"
        tokens.write_text(f"{TOKEN},admin,admin,system:masters\n")
        with open(self.workdir / "kube-apiserver.log", "ab") as log:
            self.apiserver = subprocess.Popen([
                str(self.bins / "kube-apiserver"),
                f"--etcd-servers=http://{self.etcd.endpoint}",
                f"--secure-port={self.port}", "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
                f"--cert-dir={certs}", "--authorization-mode=Node,RBAC", f"--token-auth-file={tokens}",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={sa_pub}", f"--service-account-signing-key-file={sa_key}",
                "--service-cluster-ip-range=10.0.0.0/24", "--allow-privileged=true",
            ], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready()
        self.kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "e2e",
            "clusters": [{"name": "e2e", "cluster": {"server": self.url, "insecure-skip-tls-verify": True}}],
            "users": [{"name": "admin", "user": {"token": TOKEN}}],
            "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "admin", "namespace": "default"}}],
        }))
        kc = f"--kubeconfig={self.kubeconfig}"
        self._spawn("kube-controller-manager", kc, "--controllers=*", "--leader-elect=false",
                    f"--service-account-private-key-file={sa_key}", f"--root-ca-file={certs / 'apiserver.crt'}",
                    "--use-service-account-credentials", "--secure-port=0")
        self._spawn("kube-scheduler", kc, "--leader-elect=false", "--secure-port=0")
        self._wait_default_service_account()

    def _spawn(self, name: str, *flags: str) -> None:
        """Start a control-plane component in its own session, logging to ``workdir/<name>.log``."""
        with open(self.workdir / f"{name}.log", "ab") as log:
            self.controllers[name] = subprocess.Popen([str(self.bins / name), *flags], stdout=log,
                                                      stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_default_service_account(self, timeout: float = 60) -> None:
        """The controller-manager is up once it has made ``default/default``; pods need that SA to be admitted."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.controllers.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited:\n" + self.log(name)[-3000:])
            if self.kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0:
                return
            time.sleep(0.3)
        raise TimeoutError("no default ServiceAccount:\n" + self.log("kube-controller-manager")[-3000:])

    def _wait_ready(self, timeout: float = 90) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.apiserver is not None
            if self.apiserver.poll() is not None:
                raise RuntimeError("kube-apiserver exited:\n" + self.log()[-3000:])
            try:
                req = urllib.request.Request(f"{self.url}/readyz", headers={"Authorization": f"Bearer {TOKEN}"})
                with urllib.request.urlopen(req, timeout=2, context=ctx) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError("kube-apiserver not ready:\n" + self.log()[-3000:])

    def log(self, component: str = "kube-apiserver") -> str:
        return (self.workdir / f"{component}.log").read_text(errors="replace")

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([str(self.bins / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
                             input=stdin, capture_output=True, text=True, timeout=60)
        if check and out.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {out.stderr}")
        return out

    def stop(self) -> None:
        """Controllers first (so they do not spin on a vanished API server), then the API server, then etcd."""
        for proc in [*self.controllers.values(), self.apiserver]:
            if proc is not None:
                terminate(proc)
        self.etcd.stop()
        if not os.environ.get("STATEFN_KEEP_DATA"):
            shutil.rmtree(self.workdir, ignore_errors=True)


def terminate(proc: subprocess.Popen[bytes], grace: float = 20) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``grace`` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
