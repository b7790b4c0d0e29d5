"""Running the operator: kopf's settings, the shared runtime, and the reactor.

kopf keeps its bookkeeping in annotations under our own prefix (not in ``status``: our
status schema is structural and would prune it) and uses our finalizer name, so what users
see on their resources says statefn, not kopf.
"""

from __future__ import annotations

import logging

import kopf

from statefn_core import constants
from statefn_operator import dataplane, functions, kube, metrics, runtime, settings, workflows

HANDLER_MODULES = (functions, workflows)  # imported for their kopf registrations
_log = logging.getLogger("statefn.operator")


def kopf_settings(peering: str | None) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.persistence.finalizer = constants.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=constants.ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=constants.ANNOTATION_PREFIX, key="last-handled-configuration")
    settings.posting.level = logging.INFO
    settings.execution.max_workers = 20
    # Handler failures that are not our own Temporary/Permanent errors: retry, but not in a hot loop.
    settings.batching.error_delays = (1, 2, 5, 10, 30, 60)
    if peering is not None:
        # Without its peering object a replica must not act: two active operators would both scale.
        settings.peering.mandatory = True
        settings.peering.lifetime = 30
    return settings


async def run(cfg: settings.Settings, *, namespaces: list[str], peering: str | None, priority: int = 0,
              liveness_endpoint: str | None, metrics_endpoint: tuple[str, int] | None = None) -> None:
    """Serve /metrics, connect to the data plane and the API, then hand over to kopf until a signal stops it.

    The metrics server starts first and stops last: reconcile errors while the data plane is
    unreachable are exactly what a scrape should see.
    """
    metrics_server = await metrics.serve(*metrics_endpoint) if metrics_endpoint is not None else None
    try:
        await kube.load_config()
        plane = await dataplane.DataPlane.connect(cfg.nats_url, cfg.etcd_endpoint)
        try:
            async with kube.Kube() as api:
                memo = kopf.Memo({runtime.RUNTIME: runtime.Runtime(cfg, plane, api)})
                _log.info("statefn operator: nats %s, etcd %s, %s", cfg.nats_url, cfg.etcd_endpoint,
                          f"namespaces {', '.join(namespaces)}" if namespaces else "all namespaces")
                await kopf.operator(
                    settings=kopf_settings(peering), clusterwide=not namespaces, namespaces=namespaces, memo=memo,
                    standalone=peering is None, peering_name=peering, priority=priority,
                    liveness_endpoint=liveness_endpoint)
        finally:
            await plane.close()
    finally:
        if metrics_server is not None:
            await metrics_server.cleanup()
