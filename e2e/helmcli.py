"""The helm binary of the pinned Kubernetes build, isolated from the user's helm configuration."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from e2e import harness

CHART = harness.ROOT / "charts" / "statefn"


class Helm:
    """The helm binary with its own config/cache/data dirs (nothing from the user's ~/.config/helm)."""

    def __init__(self, bins: Path, home: Path) -> None:
        self.path = bins / "helm"
        # A helm built from source without version ldflags assumes Kubernetes v1.20 when no cluster
        # is asked (lint, template) and then refuses the chart's kubeVersion; give it the real one.
        self.kube_version = bins.name.removeprefix("k8s-")
        self.env = {**os.environ, "HELM_CONFIG_HOME": str(home / "config"), "HELM_CACHE_HOME": str(home / "cache"),
                    "HELM_DATA_HOME": str(home / "data")}

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([str(self.path), *args], capture_output=True, text=True, timeout=120, env=self.env)
        if check and out.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{out.stderr}")
        return out

    def template(self, *args: str, namespace: str = "statefn-system", release: str = "sfn") -> list[dict[str, Any]]:
        out = self("template", release, str(CHART), "--namespace", namespace, "--kube-version", self.kube_version,
                   *args)
        return [doc for doc in yaml.safe_load_all(out.stdout) if doc]
