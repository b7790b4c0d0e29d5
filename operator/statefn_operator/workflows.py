"""kopf handlers for Workflow: check every step's function exists, then publish the definition.

The orchestrator (a built-in function) reads definitions from etcd, not from the Kubernetes
API, so the data plane never needs API credentials. A Workflow naming a function nobody runs
stays Ready=False and is re-checked as StatefulFunctions come and go.
"""

from __future__ import annotations

import json
from typing import Any

import kopf

from statefn_core import constants, errors, layout
from statefn_operator import conditions, functions, manifests, metrics, runtime

PLURAL = "workflows"
RESOURCE = (constants.API_GROUP, constants.API_VERSION, PLURAL)
RECHECK_INTERVAL_S = 5.0


@kopf.index(*functions.RESOURCE)
def function_types(body: kopf.Body, **_: Any) -> dict[str, str]:
    """Which StatefulFunction runs each function type (the key steps refer to)."""
    try:
        fn = manifests.function_type(dict(body))
    except errors.InvalidFunctionType:
        return {}
    return {str(fn): f"{body.metadata.namespace}/{body.metadata.name}"}


def missing_functions(spec: dict[str, Any], known: kopf.Index[str, str]) -> list[str]:
    return sorted({str(step["function"]) for step in spec.get("steps", []) if step["function"] not in known})


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE)
@kopf.timer(*RESOURCE, interval=RECHECK_INTERVAL_S, initial_delay=RECHECK_INTERVAL_S)
async def check(body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, memo: Any, **kwargs: Any) -> None:
    """``kwargs["function_types"]`` is the index above (kopf passes indices by their name)."""
    with metrics.reconciling(metrics.KIND_WORKFLOW):
        await _check(body, spec, meta, memo, kwargs["function_types"])


async def _check(body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, memo: Any, known: kopf.Index[str, str]) -> None:
    rt = runtime.of(memo)
    writer = runtime.status_writer(memo, PLURAL, body)
    generation = int(meta.get("generation") or 0)
    missing = missing_functions(dict(spec), known)
    if missing:
        message = (f"no StatefulFunction runs {', '.join(missing)} (steps must name a function type "
                   "NAMESPACE/NAME that a StatefulFunction's spec.function declares)")
        cond = conditions.Condition("Ready", False, constants.REASON_MISSING_FUNCTION, message)
        if await writer.update(generation, [cond], observedGeneration=generation, stepCount=len(spec["steps"])):
            kopf.warn(body, reason=constants.REASON_MISSING_FUNCTION, message=message)
        return
    if memo.get("published_generation") != generation:
        definition = {"generation": generation, "spec": dict(spec)}
        key = layout.workflow_key(str(meta["namespace"]), str(meta["name"]))
        await rt.dataplane.etcd.put(key.encode(), json.dumps(definition).encode())
        memo["published_generation"] = generation
    cond = conditions.Condition("Ready", True, constants.REASON_PUBLISHED,
                                f"{len(spec['steps'])} steps over functions that exist; definition published")
    if await writer.update(generation, [cond], observedGeneration=generation, stepCount=len(spec["steps"])):
        kopf.info(body, reason=constants.REASON_PUBLISHED, message=cond.message)


@kopf.on.delete(*RESOURCE)
async def unpublish(meta: kopf.Meta, memo: Any, **_: Any) -> None:
    key = layout.workflow_key(str(meta["namespace"]), str(meta["name"]))
    await runtime.of(memo).dataplane.etcd.delete(key.encode())
