"""What every handler needs, built once at start and handed over in kopf's memo."""

from __future__ import annotations

import dataclasses
from typing import Any

import kopf

from statefn_operator import dataplane, kube, settings, status

RUNTIME = "runtime"


@dataclasses.dataclass
class Runtime:
    settings: settings.Settings
    dataplane: dataplane.DataPlane
    kube: kube.Kube


def of(memo: Any) -> Runtime:
    rt = memo[RUNTIME]
    assert isinstance(rt, Runtime)
    return rt


def status_writer(memo: Any, plural: str, body: kopf.Body) -> status.StatusWriter:
    """The resource's one StatusWriter (kopf's memo is per resource and shared with its daemons)."""
    writer = memo.get("status_writer")
    if writer is None:
        current: dict[str, Any] = dict(body.get("status") or {})
        writer = memo["status_writer"] = status.StatusWriter(
            of(memo).kube, plural, body.metadata.namespace or "", body.metadata.name or "", current)
    assert isinstance(writer, status.StatusWriter)
    return writer
