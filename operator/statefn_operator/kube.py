"""The Kubernetes API calls the handlers make (kopf watches; this module writes).

Children are written with server-side apply under one field manager, so a re-run of a handler
converges instead of conflicting, and a user's own fields (annotations, extra labels) survive.
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from statefn_core import constants

APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"


async def load_config() -> None:
    """In a pod: its ServiceAccount. Elsewhere: $KUBECONFIG or ~/.kube/config (as kubectl does)."""
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    else:
        await config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))


class Kube:
    def __init__(self) -> None:
        self.api = client.ApiClient()
        self.apps = client.AppsV1Api(self.api)
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    async def __aenter__(self) -> Kube:
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.api.close()

    async def apply(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        kwargs: dict[str, Any] = {"field_manager": constants.FIELD_MANAGER, "force": True, "_content_type": APPLY}
        if obj["kind"] == "Deployment":
            await self.apps.patch_namespaced_deployment(meta["name"], meta["namespace"], obj, **kwargs)
        elif obj["kind"] == "ServiceAccount":
            await self.core.patch_namespaced_service_account(meta["name"], meta["namespace"], obj, **kwargs)
        else:
            raise ValueError(f"kube.apply does not handle {obj['kind']}")

    async def deployment(self, namespace: str, name: str) -> client.V1Deployment | None:
        try:
            return await self.apps.read_namespaced_deployment(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def scale(self, namespace: str, name: str, replicas: int) -> None:
        await self.apps.patch_namespaced_deployment_scale(
            name, namespace, {"spec": {"replicas": replicas}}, field_manager=constants.FIELD_MANAGER)

    async def delete_children(self, namespace: str, name: str) -> None:
        """The Deployment and ServiceAccount (ownerReferences would too, but only with a GC running)."""
        for delete in (self.apps.delete_namespaced_deployment, self.core.delete_namespaced_service_account):
            try:
                await delete(name, namespace, propagation_policy="Background")
            except ApiException as exc:
                if exc.status != 404:
                    raise

    async def patch_status(self, plural: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        # Custom resources take no strategic merge; without a forced type the client picks JSON Patch.
        kwargs: dict[str, Any] = {"field_manager": constants.FIELD_MANAGER, "_content_type": MERGE}
        await self.custom.patch_namespaced_custom_object_status(
            constants.API_GROUP, constants.API_VERSION, namespace, plural, name, {"status": status}, **kwargs)
