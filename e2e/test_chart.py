"""The helmcli.Helm chart: lint, schema, labels, Pod Security admission, and a real install.

helm and kubectl are the real binaries of the pinned Kubernetes build and the API server is the
session's real kube-apiserver. The install tests check what the chart creates and what its ServiceAccounts are
allowed to do; their operator pods may start on the agent node but reach no data plane (reserved .invalid names).
test_platform runs the chart against a real data plane.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import yaml

from e2e import harness, helmcli
from statefn_core import constants
from statefn_operator import manifests
from statefn_operator import metrics as operator_metrics
from statefn_operator import settings as operator_settings
from statefn_sidecar import devservers
from statefn_sidecar import metrics as sidecar_metrics

VALUES = yaml.safe_load((helmcli.CHART / "values.yaml").read_text())
APP_VERSION = yaml.safe_load((helmcli.CHART / "Chart.yaml").read_text())["appVersion"]
CHART_VERSION = yaml.safe_load((helmcli.CHART / "Chart.yaml").read_text())["version"]
IN_CHART = ("--set", "nats.enabled=true", "--set", "etcd.enabled=true")
NAMESPACED = ("--set", "operator.watchNamespaces={team-a,team-b}")
# "Anywhere": reserved names that never resolve, so operator pods that a test agent might start just retry.
EXTERNAL = ("--set", "nats.external.url=nats://nats.invalid:4222",
            "--set", "etcd.external.endpoints={etcd.invalid:2379}")
VARIANTS = {"default": (), "in-chart": IN_CHART, "namespaced": NAMESPACED + IN_CHART}
STATEFN_CRDS = ("statefulfunctions.statefn.dev", "workflows.statefn.dev")
PEERING_CRDS = ("clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev")
WORKLOADS = ("Deployment", "StatefulSet")
MONITORING = ("--set", "metrics.serviceMonitor.enabled=true", "--set", "dashboards.enabled=true")
MONITORING_KINDS = ("ServiceMonitor", "PodMonitor")


def pod_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs if d["kind"] in WORKLOADS}


def container(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    first: dict[str, Any] = pod_specs(docs)[name]["containers"][0]
    return first


def env(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


# ---- static checks: lint, schema, rendering ---------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lint_strict(helm: helmcli.Helm, variant: str) -> None:
    out = helm("lint", "--strict", str(helmcli.CHART), "--kube-version", helm.kube_version, *VARIANTS[variant])
    assert "1 chart(s) linted, 0 chart(s) failed" in out.stdout, out.stdout


@pytest.mark.parametrize(
    ("setting", "where", "key"),
    [
        ("replica=2", "''", "replica"),
        ("operator.replica=2", "'/operator'", "replica"),
        ("nats.storage.sise=1Gi", "'/nats/storage'", "sise"),
        ("gateway.pdb.minAvailable=1", "'/gateway/pdb'", "minAvailable"),
        ("operator.resources.limits.gpu=1", "'/operator/resources/limits'", "gpu"),
        ("metrics.serviceMonitor.enable=true", "'/metrics/serviceMonitor'", "enable"),
        ("serviceMonitor.enabled=true", "''", "serviceMonitor"),  # the old placeholder, now metrics.serviceMonitor
    ],
    ids=["top", "operator", "nats-storage", "gateway-pdb", "resources", "service-monitor", "old-service-monitor"],
)
def test_unknown_keys_are_rejected(helm: helmcli.Helm, setting: str, where: str, key: str) -> None:
    """A typo fails the install instead of being ignored, and the error names the key."""
    for command in (("template", "x", str(helmcli.CHART)), ("lint", str(helmcli.CHART))):
        out = helm(*command, "--kube-version", helm.kube_version, "--set", setting, check=False)
        assert out.returncode != 0, out.stdout
        assert f"at {where}: additional properties '{key}' not allowed" in out.stdout + out.stderr, out.stderr


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (("--set", "nats.external.url="), "at '/nats/external/url'"),
        (("--set", "etcd.external.endpoints=null"), "at '/etcd/external'"),
        (("--set", "nats.syncInterval=sometimes"), "at '/nats/syncInterval'"),
        (("--set", "image.pullPolicy=Maybe"), "at '/image/pullPolicy'"),
        (("--set", "metrics.serviceMonitor.interval=often"), "at '/metrics/serviceMonitor/interval'"),
        (("--set", "dashboards.namespace=Not_A_Namespace"), "at '/dashboards/namespace'"),
        (("--set", "tracing.otlpEndpoint=collector:4318"), "at '/tracing/otlpEndpoint'"),
        (("--set", "tracing.protocol=http/json"), "at '/tracing/protocol'"),
    ],
    ids=["no-nats", "no-etcd", "bad-sync", "bad-pull-policy", "scrape-interval", "dashboard-namespace",
         "otlp-endpoint-without-scheme", "otlp-protocol"],
)
def test_invalid_values_are_refused(helm: helmcli.Helm, settings: tuple[str, ...], message: str) -> None:
    out = helm("template", "x", str(helmcli.CHART), "--kube-version", helm.kube_version, *settings, check=False)
    assert out.returncode != 0 and message in out.stderr, out.stderr


def test_schema_is_closed_everywhere() -> None:
    """Every object in values.schema.json names its keys, except maps and Kubernetes pass-throughs.

    Maps (nodeSelector) give ``additionalProperties`` a schema; objects that are handed to the API
    server unchanged (affinity terms) say so in a ``$comment`` and are validated there.
    """
    schema = json.loads((helmcli.CHART / "values.schema.json").read_text())
    open_objects: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "additionalProperties" not in node and "$comment" not in node:
                open_objects.append(path)
            for k, v in node.items():
                walk(v, f"{path}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}/{i}")

    walk(schema, "")
    assert open_objects == []
    assert schema["additionalProperties"] is False


def test_every_object_carries_the_standard_labels(helm: helmcli.Helm) -> None:
    docs = helm.template(*VARIANTS["namespaced"], *MONITORING, "--set", "gateway.pdb.enabled=true")
    expected = {"helm.sh/chart": f"statefn-{CHART_VERSION}", "app.kubernetes.io/name": "statefn",
                "app.kubernetes.io/instance": "sfn", "app.kubernetes.io/version": APP_VERSION,
                "app.kubernetes.io/part-of": "statefn", "app.kubernetes.io/managed-by": "Helm"}
    kinds = set()
    for doc in docs:
        kinds.add(doc["kind"])
        labelled = [doc["metadata"]]
        if doc["kind"] in WORKLOADS:
            labelled.append(doc["spec"]["template"]["metadata"])
            labelled += [t["metadata"] for t in doc["spec"].get("volumeClaimTemplates", [])]
        for meta in labelled:
            labels = meta.get("labels", {})
            assert {k: labels.get(k) for k in expected} == expected, (doc["kind"], doc["metadata"]["name"])
            assert labels.get("app.kubernetes.io/component") in {"operator", "gateway", "nats", "etcd", "monitoring"}
    assert kinds >= {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Deployment",
                     "Service", "StatefulSet", "ConfigMap", "PodDisruptionBudget", "KopfPeering", "ServiceMonitor",
                     "PodMonitor"}


def test_crds_ship_with_the_chart(helm: helmcli.Helm) -> None:
    """crds/ at the repo root points into the chart, so kubectl and helm install the same files."""
    chart_crds = sorted(p.name for p in (helmcli.CHART / "crds").glob("*.yaml"))
    root = harness.ROOT / "crds"
    assert sorted(p.name for p in root.glob("*.yaml")) == chart_crds
    assert all((root / n).resolve() == (helmcli.CHART / "crds" / n).resolve() for n in chart_crds)
    # `helm show crds` concatenates the files as they are: each starts with "---" or two would merge.
    shown = [d for d in yaml.safe_load_all(helm("show", "crds", str(helmcli.CHART)).stdout) if d]
    assert sorted(d["metadata"]["name"] for d in shown) == sorted(STATEFN_CRDS + PEERING_CRDS)
    scopes = {d["spec"]["names"]["kind"]: d["spec"]["scope"] for d in shown if d["spec"]["group"] == "kopf.dev"}
    assert scopes == {"ClusterKopfPeering": "Cluster", "KopfPeering": "Namespaced"}
    included = helm.template("--include-crds")
    assert {d["metadata"]["name"] for d in included if d["kind"] == "CustomResourceDefinition"} == set(
        STATEFN_CRDS + PEERING_CRDS)


def test_operator_and_gateway_follow_the_pod_contract(helm: helmcli.Helm) -> None:
    docs = helm.template(*EXTERNAL)
    op, gw = container(docs, "sfn-statefn-operator"), container(docs, "sfn-statefn-gateway")
    assert op["command"] == ["statefn", "operator", "--peering", "sfn-statefn", "--all-namespaces",
                             "--health-host", "$(POD_IP)", "--health-port", "8080",
                             "--metrics-host", "$(POD_IP)", "--metrics-port", str(constants.OPERATOR_METRICS_PORT)]
    assert gw["command"] == ["statefn", "gateway", "--host", "$(POD_IP)", "--port", "8080"]
    image = f"{VALUES['image']['repository']}:{APP_VERSION}"
    assert op["image"] == gw["image"] == image
    assert env(op) == {"STATEFN_NATS": "nats://nats.invalid:4222", "STATEFN_ETCD": "etcd.invalid:2379",
                       "POD_IP": {"fieldRef": {"fieldPath": "status.podIP"}}, "STATEFN_SIDECAR_IMAGE": image,
                       "STATEFN_STREAM_REPLICAS": "1", "STATEFN_AUTOSCALE_INTERVAL": "5"}
    operator_only = ("STATEFN_SIDECAR_IMAGE", "STATEFN_STREAM_REPLICAS", "STATEFN_AUTOSCALE_INTERVAL")
    assert env(gw) == {k: v for k, v in env(op).items() if k not in operator_only}
    assert [(p["httpGet"]["path"], p["httpGet"]["port"]) for p in (op["livenessProbe"], op["readinessProbe"])] == [
        ("/healthz", "health"), ("/healthz", "health")]
    assert op["ports"] == [{"name": "health", "containerPort": 8080, "protocol": "TCP"},
                           {"name": "metrics", "containerPort": constants.OPERATOR_METRICS_PORT, "protocol": "TCP"}]
    assert [gw["livenessProbe"]["httpGet"]["path"], gw["readinessProbe"]["httpGet"]["path"]] == ["/healthz", "/readyz"]
    svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "sfn-statefn-gateway")
    assert (svc["spec"]["type"], svc["spec"]["ports"][0]["port"], svc["spec"]["ports"][0]["targetPort"]) == (
        "ClusterIP", 80, "http")
    specs = pod_specs(docs)
    assert specs["sfn-statefn-gateway"]["automountServiceAccountToken"] is False
    assert {d["metadata"]["name"]: d["spec"]["replicas"] for d in docs if d["kind"] == "Deployment"} == {
        "sfn-statefn-operator": 2, "sfn-statefn-gateway": 2}
    assert not [d for d in docs if d["kind"] in MONITORING_KINDS or d["metadata"]["name"] == "sfn-statefn-dashboard"]
    peering = [d for d in docs if d["kind"] == "ClusterKopfPeering"]
    assert [d["metadata"]["name"] for d in peering] == ["sfn-statefn"]

    traced = helm.template(*EXTERNAL, "--set", "tracing.otlpEndpoint=http://collector.obs:4318",
                           "--set", "tracing.sampler=parentbased_traceidratio", "--set", "tracing.samplerArg=0.25")
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector.obs:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}
    for name in ("sfn-statefn-operator", "sfn-statefn-gateway"):  # the operator forwards them to every sidecar
        assert {k: v for k, v in env(container(traced, name)).items() if k.startswith("OTEL_")} == otel

    tagged = helm.template("--set", "image.tag=dev", "--set", "image.repository=statefn", *NAMESPACED)
    op = container(tagged, "sfn-statefn-operator")
    assert op["image"] == env(op)["STATEFN_SIDECAR_IMAGE"] == "statefn:dev"
    assert op["command"][4:8] == ["--namespace", "team-a", "--namespace", "team-b"]
    assert "--all-namespaces" not in op["command"]
    assert sorted((d["kind"], d["metadata"]["namespace"]) for d in tagged if d["kind"] in ("KopfPeering", "Role")) == [
        ("KopfPeering", "team-a"), ("KopfPeering", "team-b"), ("Role", "team-a"), ("Role", "team-b")]
    assert not [d for d in tagged if d["kind"] == "ClusterKopfPeering"]


def test_in_chart_data_plane_is_durable_by_default(helm: helmcli.Helm, tmp_path: Path) -> None:
    docs = helm.template(*IN_CHART)
    op = container(docs, "sfn-statefn-operator")
    assert env(op)["STATEFN_NATS"] == "nats://sfn-statefn-nats.statefn-system.svc.cluster.local:4222"
    assert env(op)["STATEFN_ETCD"] == "sfn-statefn-etcd.statefn-system.svc.cluster.local:2379"
    assert env(op)["STATEFN_STREAM_REPLICAS"] == "3"  # every function's stream survives one server's loss
    sets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "StatefulSet"}
    nats, etcd = sets["sfn-statefn-nats"], sets["sfn-statefn-etcd"]
    assert nats["spec"]["replicas"] == etcd["spec"]["replicas"] == 3
    for sts in (nats, etcd):
        (claim,) = sts["spec"]["volumeClaimTemplates"]
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    conf = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["nats.conf"]
    assert re.search(r"^\s*sync_interval: always$", conf, re.M)
    assert conf.count("nats://sfn-statefn-nats-") == 3
    # The real nats-server accepts the rendered configuration (-t: parse and check only).
    (tmp_path / "nats.conf").write_text(conf)
    out = subprocess.run([devservers.find_binary("nats-server"), "-t", "-c", str(tmp_path / "nats.conf")],
                         capture_output=True, text=True, timeout=30, env={**os.environ, "SERVER_NAME": "n-0"})
    assert out.returncode == 0, out.stderr
    etcd_tag = etcd["spec"]["template"]["spec"]["containers"][0]["image"].rsplit(":v", 1)[1]
    assert tuple(int(x) for x in etcd_tag.split(".")) >= (3, 5, 6)
    args = etcd["spec"]["template"]["spec"]["containers"][0]["command"]
    assert ("--initial-cluster=" + ",".join(
        f"sfn-statefn-etcd-{i}=http://sfn-statefn-etcd-{i}.sfn-statefn-etcd-headless.statefn-system.svc.cluster.local:2380"
        for i in range(3))) in args
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "PodDisruptionBudget"} == {
        "sfn-statefn-nats", "sfn-statefn-etcd"}


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return bool(selector["matchLabels"]) and selector["matchLabels"].items() <= labels.items()


def function_pod_template() -> dict[str, Any]:
    """The pod template the operator gives a function (what the PodMonitor must select)."""
    body = {"apiVersion": "statefn.dev/v1alpha1", "kind": "StatefulFunction",
            "metadata": {"name": "counter", "namespace": "team-a", "uid": "u"},
            "spec": {"image": "statefn:dev", "app": "examples.counter.app:app"}}
    cfg = operator_settings.Settings(nats_url="nats://n:4222", etcd_endpoint="e:2379")
    template: dict[str, Any] = manifests.deployment(body, cfg, 1)["spec"]["template"]
    return template


def test_monitors_select_the_metrics_ports(helm: helmcli.Helm) -> None:
    docs = helm.template(*EXTERNAL, *MONITORING, "--set", "metrics.serviceMonitor.interval=15s",
                         "--set", "metrics.serviceMonitor.labels.release=prometheus")
    services, deployments = by_kind(docs, "Service"), by_kind(docs, "Deployment")
    monitors, (pod_monitor,) = by_kind(docs, "ServiceMonitor"), by_kind(docs, "PodMonitor").values()
    assert sorted(monitors) == ["sfn-statefn-gateway", "sfn-statefn-operator"]
    for name, port in (("sfn-statefn-operator", "metrics"), ("sfn-statefn-gateway", "http")):
        monitor, svc = monitors[name], services[name]
        # The monitor picks this Service and no other; the Service picks this component's pods.
        assert [n for n, other in services.items() if selects(monitor["spec"]["selector"], other["metadata"]["labels"])
                ] == [name]
        pod_labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["statefn-system"]}
        assert monitor["spec"]["endpoints"] == [{"port": port, "path": "/metrics", "interval": "15s"}]
        # The endpoint names a Service port whose target is a named port of the container.
        (svc_port,) = [p for p in svc["spec"]["ports"] if p["name"] == port]
        container_ports = {p["name"]: p["containerPort"] for p in container(docs, name)["ports"]}
        assert svc_port["targetPort"] in container_ports
        assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert services["sfn-statefn-operator"]["spec"]["ports"][0]["port"] == constants.OPERATOR_METRICS_PORT

    # Function pods are the operator's: the PodMonitor selects the labels manifests.py gives them, and scrapes
    # the sidecar's named health port (which serves /metrics next to /healthz).
    template = function_pod_template()
    assert selects(pod_monitor["spec"]["selector"], template["metadata"]["labels"])
    assert not any(selects(pod_monitor["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
                   for d in docs if d["kind"] in WORKLOADS)
    sidecar_ports = [p["name"] for c in template["spec"]["initContainers"] for p in c.get("ports", [])]
    assert pod_monitor["spec"]["podMetricsEndpoints"] == [{"port": "health", "path": "/metrics", "interval": "15s"}]
    assert "health" in sidecar_ports
    assert pod_monitor["spec"]["namespaceSelector"] == {"any": True}
    assert pod_monitor["metadata"]["labels"]["release"] == "prometheus"

    scoped = helm.template(*EXTERNAL, *MONITORING, *NAMESPACED, "--set", "gateway.enabled=false")
    assert sorted(by_kind(scoped, "ServiceMonitor")) == ["sfn-statefn-operator"]
    (pod_monitor,) = by_kind(scoped, "PodMonitor").values()
    assert pod_monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def defined_metric_samples() -> set[str]:
    """Every sample name the statefn processes can expose (counters end in _total, histograms in _bucket...)."""
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",),
                "histogram": ("_bucket", "_sum", "_count", "_created")}
    names = set()
    for module in (sidecar_metrics, operator_metrics):
        for value in vars(module).values():
            if isinstance(value, prometheus_client.metrics.MetricWrapperBase):
                for family in value.describe():
                    names |= {family.name + suffix for suffix in suffixes[family.type]}
    return names


def test_dashboard_ships_in_a_configmap_and_names_real_metrics(helm: helmcli.Helm) -> None:
    shipped = (helmcli.CHART / "dashboards" / "statefn.json").read_text()
    dashboard = json.loads(shipped)
    docs = helm.template(*EXTERNAL, "--set", "dashboards.enabled=true",
                         "--set", "dashboards.annotations.grafana_folder=statefn")
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "statefn"}
    assert cm["metadata"]["namespace"] == "statefn-system"
    assert json.loads(cm["data"]["statefn.json"]) == dashboard
    elsewhere = helm.template(*EXTERNAL, "--set", "dashboards.enabled=true", "--set", "dashboards.namespace=grafana")
    assert [d["metadata"]["namespace"] for d in elsewhere if d["kind"] == "ConfigMap"] == ["grafana"]

    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    assert variables["function"]["type"] == "query" and variables["function"]["multi"]
    templated = {"type": "prometheus", "uid": "${datasource}"}
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    exprs = []
    for panel in panels:
        assert panel["datasource"] == templated, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == templated, panel["title"]
            exprs.append(target["expr"])
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])

    # Renaming a metric in statefn_sidecar.metrics or statefn_operator.metrics fails here until the dashboard follows.
    referenced = set(re.findall(r"\bstatefn_[a-z0-9_]*[a-z0-9]", shipped))
    assert referenced, "no metric found"
    unknown = referenced - defined_metric_samples()
    assert not unknown, f"the dashboard uses metrics nobody exposes: {sorted(unknown)}"
    # The panels the dashboard promises, by the metric each one reads.
    used = " ".join(exprs)
    for name in ("statefn_invocations_total", "statefn_invocation_duration_seconds_bucket",
                 "statefn_commit_batch_size_bucket", "statefn_function_lag", "statefn_function_desired_replicas",
                 "statefn_function_ready_replicas", 'outcome="retry"', "statefn_dead_letters_total",
                 "statefn_partitions_owned", "statefn_gateway_requests_total",
                 "statefn_gateway_request_duration_seconds_bucket"):
        assert name in used, name
    assert all(re.search(r'function=~"\$function"', e) for e in exprs if "statefn_operator_reconcile" not in e)


# ---- against the real API server ----------------------------------------------------------------

PSA_NS = "psa-chart"


@pytest.fixture(scope="module")
def restricted(cluster: harness.ControlPlane) -> harness.ControlPlane:
    cluster.kubectl("create", "namespace", PSA_NS)
    cluster.kubectl("label", "namespace", PSA_NS, "pod-security.kubernetes.io/enforce=restricted",
                    "pod-security.kubernetes.io/warn=restricted")
    return cluster


def _dry_run(cluster: harness.ControlPlane, obj: dict[str, Any]) -> tuple[int, str]:
    out = cluster.kubectl("apply", "--dry-run=server", "-f", "-", stdin=json.dumps(obj), check=False)
    return out.returncode, out.stderr


def test_every_pod_template_is_admitted_as_restricted(helm: helmcli.Helm, restricted: harness.ControlPlane) -> None:
    docs = helm.template(*IN_CHART, namespace=PSA_NS)
    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    assert sorted(d["metadata"]["name"] for d in workloads) == [
        "sfn-statefn-etcd", "sfn-statefn-gateway", "sfn-statefn-nats", "sfn-statefn-operator"]
    for obj in workloads:
        code, warnings = _dry_run(restricted, obj)
        assert code == 0 and "PodSecurity" not in warnings, (obj["metadata"]["name"], warnings)
    # Not vacuous: the same admission reports a template without the hardening.
    bare = json.loads(json.dumps(workloads[0]))
    del bare["spec"]["template"]["spec"]["securityContext"]
    for c in bare["spec"]["template"]["spec"]["containers"]:
        del c["securityContext"]
    code, warnings = _dry_run(restricted, bare)
    assert code == 0 and 'would violate PodSecurity "restricted:latest"' in warnings, warnings


RELEASE_NS = "statefn-system"
OPERATOR_SA = f"system:serviceaccount:{RELEASE_NS}:sfn-statefn-operator"
GATEWAY_SA = f"system:serviceaccount:{RELEASE_NS}:sfn-statefn-gateway"


@pytest.fixture(scope="module")
def installed(helm: helmcli.Helm, cluster: harness.ControlPlane) -> Iterator[subprocess.CompletedProcess[str]]:
    """The chart installed as a user would, with the data plane somewhere else (nothing runs)."""
    kube = ("--kubeconfig", str(cluster.kubeconfig))
    out = helm("install", "sfn", str(helmcli.CHART), "--namespace", RELEASE_NS, "--create-namespace", *EXTERNAL, *kube)
    yield out
    helm("uninstall", "sfn", "--namespace", RELEASE_NS, "--wait", *kube)


def can(cluster: harness.ControlPlane, who: str, verb: str, what: str, *where: str) -> bool:
    out = cluster.kubectl("auth", "can-i", verb, what, f"--as={who}", *where, check=False)
    assert out.stdout.strip() in ("yes", "no"), out.stderr
    return out.stdout.strip() == "yes"


def test_install_creates_crds_deployments_and_rbac(
    installed: subprocess.CompletedProcess[str], cluster: harness.ControlPlane,
) -> None:
    assert "STATUS: deployed" in installed.stdout
    assert "/v1/functions/demo/counter/k1/increment" in installed.stdout  # NOTES.txt
    assert "kubectl apply -f examples/counter/k8s/counter.yaml" in installed.stdout
    for crd in STATEFN_CRDS + PEERING_CRDS:
        crd_obj = json.loads(cluster.kubectl("get", "crd", crd, "-o", "json").stdout)
        # helmcli.Helm's crds/ directory creates, never owns: kubectl apply -f crds/ keeps working next to it.
        assert "meta.helm.sh/release-name" not in crd_obj["metadata"].get("annotations", {})
    deps = json.loads(cluster.kubectl("get", "deployments", "-n", RELEASE_NS, "-o", "json").stdout)["items"]
    assert {d["metadata"]["name"]: d["spec"]["replicas"] for d in deps} == {
        "sfn-statefn-operator": 2, "sfn-statefn-gateway": 2}
    cluster.kubectl("get", "service", "sfn-statefn-gateway", "-n", RELEASE_NS)
    cluster.kubectl("get", "clusterrole,clusterrolebinding", "sfn-statefn-operator")
    cluster.kubectl("get", "clusterkopfpeering", "sfn-statefn")
    assert cluster.kubectl("get", "serviceaccount", "sfn-statefn-gateway", "-n", RELEASE_NS, "-o",
                           "jsonpath={.automountServiceAccountToken}").stdout == "false"


@pytest.mark.parametrize(
    ("verb", "what", "allowed"),
    [
        ("watch", "statefulfunctions.statefn.dev", True),
        ("patch", "statefulfunctions.statefn.dev/status", True),
        ("update", "statefulfunctions.statefn.dev/finalizers", True),
        ("patch", "workflows.statefn.dev/status", True),
        ("create", "deployments.apps", True),
        ("patch", "deployments.apps/scale", True),
        ("delete", "serviceaccounts", True),
        ("create", "events", True),
        ("create", "events.events.k8s.io", True),
        ("patch", "clusterkopfpeerings.kopf.dev", True),
        ("list", "customresourcedefinitions.apiextensions.k8s.io", True),
        ("watch", "namespaces", True),
        ("create", "statefulfunctions.statefn.dev", False),
        ("delete", "statefulfunctions.statefn.dev", False),
        ("get", "secrets", False),
        ("create", "pods", False),
        ("create", "rolebindings.rbac.authorization.k8s.io", False),
        ("create", "customresourcedefinitions.apiextensions.k8s.io", False),
        ("delete", "namespaces", False),
        ("patch", "kopfpeerings.kopf.dev", False),
    ],
)
def test_operator_rights_are_least_privilege(
    installed: subprocess.CompletedProcess[str], cluster: harness.ControlPlane, verb: str, what: str, allowed: bool,
) -> None:
    assert can(cluster, OPERATOR_SA, verb, what, "--all-namespaces") is allowed


def test_gateway_has_no_rights(installed: subprocess.CompletedProcess[str], cluster: harness.ControlPlane) -> None:
    rules = cluster.kubectl("auth", "can-i", "--list", f"--as={GATEWAY_SA}", "-n", RELEASE_NS).stdout
    # Only what every authenticated user gets (self reviews, discovery), nothing on resources.
    resources = [line.split()[0] for line in rules.splitlines()[1:] if line.split() and "/" not in line.split()[0]]
    assert set(resources) <= {"selfsubjectreviews.authentication.k8s.io",
                              "selfsubjectaccessreviews.authorization.k8s.io",
                              "selfsubjectrulesreviews.authorization.k8s.io"}, rules


def test_namespaced_release_gets_roles_only_where_it_watches(
    helm: helmcli.Helm, cluster: harness.ControlPlane, installed: subprocess.CompletedProcess[str],
) -> None:
    """A second release watching one namespace: Role + KopfPeering there, nothing elsewhere."""
    kube = ("--kubeconfig", str(cluster.kubeconfig))
    cluster.kubectl("create", "namespace", "team-a")
    helm("install", "scoped", str(helmcli.CHART), "--namespace", RELEASE_NS, *EXTERNAL, *kube,
         "--set", "operator.watchNamespaces={team-a}", "--set", "gateway.enabled=false")
    try:
        who = f"system:serviceaccount:{RELEASE_NS}:scoped-statefn-operator"
        assert can(cluster, who, "create", "deployments.apps", "-n", "team-a")
        assert can(cluster, who, "patch", "kopfpeerings.kopf.dev", "-n", "team-a")
        assert not can(cluster, who, "create", "deployments.apps", "-n", "default")
        assert not can(cluster, who, "patch", "statefulfunctions.statefn.dev", "-n", RELEASE_NS)
        assert not can(cluster, who, "patch", "clusterkopfpeerings.kopf.dev")
        assert can(cluster, who, "watch", "namespaces")
        cluster.kubectl("get", "kopfpeering", "scoped-statefn", "-n", "team-a")
        assert cluster.kubectl("get", "deployment", "scoped-statefn-gateway", "-n", RELEASE_NS,
                               check=False).returncode != 0
    finally:
        helm("uninstall", "scoped", "--namespace", RELEASE_NS, "--wait", *kube)
    assert cluster.kubectl("get", "role", "scoped-statefn-operator", "-n", "team-a", check=False).returncode != 0
    cluster.kubectl("get", "crd", *STATEFN_CRDS)  # uninstalling never deletes the CRDs


MON_NS = "monitoring-chart"
PROMETHEUS_CRDS = ("servicemonitors.monitoring.coreos.com", "podmonitors.monitoring.coreos.com")


@pytest.fixture(scope="module")
def monitoring_crds(cluster: harness.ControlPlane) -> harness.ControlPlane:
    """The Prometheus Operator's own CRDs (pinned, cached outside the clone by scripts/fetch-prometheus-crds.sh)."""
    out = subprocess.run(["bash", str(harness.ROOT / "scripts" / "fetch-prometheus-crds.sh")], check=True,
                         capture_output=True, text=True, timeout=600)
    crd_dir = Path(out.stdout.strip().splitlines()[-1])
    for crd in sorted(crd_dir.glob("*.yaml")):
        cluster.kubectl("apply", "--server-side", "-f", str(crd))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{c}" for c in PROMETHEUS_CRDS))
    return cluster


def test_monitors_install_against_the_prometheus_operator_crds(
    helm: helmcli.Helm, monitoring_crds: harness.ControlPlane,
) -> None:
    """The API server validates the chart's ServiceMonitors and PodMonitor with the real CRD schemas."""
    cluster = monitoring_crds
    kube = ("--kubeconfig", str(cluster.kubeconfig))
    values = (*EXTERNAL, *MONITORING, "--set", "operator.replicas=1", "--set", "gateway.replicas=1",
              "--set", "metrics.serviceMonitor.labels.release=prometheus")
    out = helm("install", "mon", str(helmcli.CHART), "--namespace", MON_NS, "--create-namespace", *values, *kube)
    try:
        assert "PodMonitor mon-statefn-functions" in out.stdout and "ConfigMap mon-statefn-dashboard" in out.stdout
        stored = json.loads(cluster.kubectl("get", "servicemonitors,podmonitors", "-n", MON_NS, "-o", "json").stdout)
        rendered = [d for d in helm.template(*values, namespace=MON_NS, release="mon") if d["kind"] in MONITORING_KINDS]
        assert sorted((d["kind"], d["metadata"]["name"]) for d in stored["items"]) == sorted(
            (d["kind"], d["metadata"]["name"]) for d in rendered) == [
            ("PodMonitor", "mon-statefn-functions"), ("ServiceMonitor", "mon-statefn-gateway"),
            ("ServiceMonitor", "mon-statefn-operator")]
        # Stored as rendered: no field was pruned as unknown to the schema.
        by_name = {d["metadata"]["name"]: d["spec"] for d in stored["items"]}
        for doc in rendered:
            assert by_name[doc["metadata"]["name"]] == doc["spec"], doc["metadata"]["name"]
        cm = json.loads(cluster.kubectl("get", "configmap", "mon-statefn-dashboard", "-n", MON_NS, "-o", "json").stdout)
        assert json.loads(cm["data"]["statefn.json"])["uid"] == "statefn-overview"
    finally:
        helm("uninstall", "mon", "--namespace", MON_NS, "--wait", *kube)

    # Not vacuous: the same schemas refuse a misspelt field and a malformed interval.
    pod_monitor = next(d for d in rendered if d["kind"] == "PodMonitor")
    typo = json.loads(json.dumps(pod_monitor))
    typo["spec"]["podMetricsEndpoints"][0]["prot"] = "health"
    bad_interval = json.loads(json.dumps(pod_monitor))
    bad_interval["spec"]["podMetricsEndpoints"][0]["interval"] = "30 seconds"
    for bad, message in ((typo, 'unknown field "spec.podMetricsEndpoints[0].prot"'), (bad_interval, "interval")):
        out = cluster.kubectl("create", "--dry-run=server", "--validate=strict", "-f", "-", stdin=json.dumps(bad),
                              check=False)
        assert out.returncode != 0 and message in out.stderr, out.stderr
