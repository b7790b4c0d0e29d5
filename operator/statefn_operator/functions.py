"""kopf handlers for StatefulFunction: provision, roll out, autoscale, clean up.

Create, update and resume all run one idempotent reconcile (what exists is converged, not
re-created). A daemon per function reads its lag, decides replicas and keeps the status
current; it is the only place that scales, so decisions cannot race each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from typing import Any

import kopf

from statefn_core import connect, constants, errors, layout
from statefn_operator import autoscaling, conditions, manifests, metrics, runtime
from statefn_sidecar import topology

PLURAL = "statefulfunctions"
DEAD_LETTER_TRIM_INTERVAL_S = 60.0
_log = logging.getLogger("statefn.operator.functions")
RESOURCE = (constants.API_GROUP, constants.API_VERSION, PLURAL)
PROVISIONED = "Provisioned"
READY = "Ready"


def _initial_replicas(spec: dict[str, Any], existing: int | None) -> int:
    """Keep what the autoscaler decided, within the (possibly edited) bounds."""
    policy = autoscaling.Policy.from_spec(spec)
    if existing is None:
        return policy.min_replicas
    return min(max(existing, policy.min_replicas), policy.ceiling)


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE)
async def reconcile(body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, memo: Any,
                    logger: kopf.Logger, **_: Any) -> None:
    with metrics.reconciling(metrics.KIND_FUNCTION):
        await _reconcile(body, spec, meta, memo, logger)


async def _reconcile(body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, memo: Any, logger: kopf.Logger) -> None:
    rt = runtime.of(memo)
    writer = runtime.status_writer(memo, PLURAL, body)
    generation = int(meta.get("generation") or 0)
    raw = dict(body)
    try:
        fn = manifests.function_type(raw)
        await rt.dataplane.provision(fn, int(spec.get("partitions", constants.DEFAULT_PARTITIONS)),
                                     stream_replicas=rt.settings.stream_replicas)
    except (errors.InvalidFunctionType, topology.PartitionMismatch) as exc:
        await _refuse(body, writer, generation, str(exc))
        raise kopf.PermanentError(str(exc)) from exc
    except Exception as exc:
        if not connect.etcd_transient(exc) and not isinstance(exc, (OSError, TimeoutError)):
            raise
        await writer.update(generation, [conditions.Condition(
            PROVISIONED, False, constants.REASON_PROVISION_FAILED, f"NATS or etcd unavailable: {exc}")])
        raise kopf.TemporaryError(f"data plane unavailable: {exc}", delay=5) from exc

    name, namespace = manifests.name_of(raw), str(meta["namespace"])
    current = await rt.kube.deployment(namespace, name)
    replicas = _initial_replicas(dict(spec), current.spec.replicas if current is not None else None)
    await rt.kube.apply(manifests.service_account(raw))
    await rt.kube.apply(manifests.deployment(raw, rt.settings, replicas))
    memo["applied_generation"] = generation
    changed = await writer.update(
        generation,
        [conditions.Condition(PROVISIONED, True, constants.REASON_PROVISIONED,
                              f"stream {fn.stream} with {spec.get('partitions')} partition consumers; "
                              f"Deployment {name}")],
        observedGeneration=generation, function=str(fn), selector=manifests.selector_string(raw))
    verb = "Created" if current is None else "Updated"
    kopf.info(body, reason=verb, message=f"{verb} Deployment {name} ({replicas} replicas) for {fn}")
    if changed:
        kopf.info(body, reason=constants.REASON_PROVISIONED, message=changed[0].message)
    logger.info("reconciled %s generation %d", fn, generation)


async def _refuse(body: kopf.Body, writer: Any, generation: int, message: str) -> None:
    """A spec the operator cannot run: say why in status and in an Event, then stop retrying."""
    refused = conditions.Condition(PROVISIONED, False, constants.REASON_PROVISION_FAILED, message)
    await writer.update(generation, [refused, conditions.Condition(READY, False, constants.REASON_PROVISION_FAILED,
                                                                   message)], observedGeneration=generation)
    kopf.warn(body, reason=constants.REASON_PROVISION_FAILED, message=message)


@kopf.on.delete(*RESOURCE)
async def remove(body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, memo: Any, **_: Any) -> None:
    rt = runtime.of(memo)
    raw = dict(body)
    await rt.kube.delete_children(str(meta["namespace"]), manifests.name_of(raw))
    try:
        fn = manifests.function_type(raw)
    except errors.InvalidFunctionType:
        return  # never provisioned
    metrics.forget_function(str(fn), _resource(meta))
    delete_data = spec.get("deletionPolicy") == "Delete"
    await rt.dataplane.remove(fn, delete_data=delete_data)
    kept = "stream and state deleted" if delete_data else "stream and state kept (deletionPolicy Retain)"
    kopf.info(body, reason="Deleted", message=f"Deployment and registration of {fn} removed; {kept}")


@kopf.daemon(*RESOURCE, cancellation_timeout=10)
async def autoscale(body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, memo: Any,
                    stopped: kopf.DaemonStopped, logger: kopf.Logger, **_: Any) -> None:
    """Every interval: read lag, decide replicas, scale, and refresh status (Ready, Lag, Replicas)."""
    rt = runtime.of(memo)
    try:
        while not stopped:
            try:
                await _tick(body, spec, meta, memo)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("autoscaling tick failed: %s", exc)
            await stopped.wait(rt.settings.autoscale_interval)
    finally:
        # Deleted, or this replica stood down: whoever runs the daemon next reports the function.
        with contextlib.suppress(errors.InvalidFunctionType):
            metrics.forget_function(str(manifests.function_type(dict(body))), _resource(meta))


async def _trim_dead_letters(fn: layout.FunctionType, spec: dict[str, Any], memo: Any, rt: runtime.Runtime,
                             now: float) -> None:
    """The spec's ``deadLetters`` retention, enforced at most once a minute (a purge by age reads the old ones)."""
    policy = spec.get("deadLetters") or {}
    if not policy or now - float(memo.get("dead_letters_trimmed", 0.0)) < DEAD_LETTER_TRIM_INTERVAL_S:
        return
    memo["dead_letters_trimmed"] = now
    gone = await rt.dataplane.trim_dead_letters(fn, max_age=policy.get("maxAgeSeconds"),
                                                max_messages=policy.get("maxMessages"))
    if gone:
        _log.info("%s: %d dead letter(s) past the spec's retention purged", fn, gone)


def _resource(meta: kopf.Meta) -> str:
    return f"{meta['namespace']}/{meta['name']}"


async def _tick(body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, memo: Any) -> None:
    rt = runtime.of(memo)
    raw = dict(body)
    if "applied_generation" not in memo:
        return  # the reconcile has not run (or has refused this spec)
    fn = manifests.function_type(raw)
    name, namespace = manifests.name_of(raw), str(meta["namespace"])
    lag = await rt.dataplane.lag(fn)
    dep = await rt.kube.deployment(namespace, name)
    if lag is None or dep is None:
        return
    work = await rt.dataplane.pending_work(fn)
    current = int(dep.spec.replicas or 0)
    ready_pods = int(dep.status.ready_replicas or 0) if dep.status else 0
    now = time.monotonic()
    history = memo.get("history")
    if not isinstance(history, autoscaling.History):
        history = memo["history"] = autoscaling.History(now, current)
    clock = _wake_clock(memo, body)
    fields: dict[str, Any] = {}
    woke = clock.observe(now, ready_pods)
    if woke is not None:
        fields["wakeUpSeconds"] = round(woke, 1)
    pending = autoscaling.Pending(
        inbox=work.inbox, due_in=work.due_in(int(time.time() * 1000)),
        wake_lead=clock.estimate + rt.settings.autoscale_interval + constants.WAKE_MARGIN_S)
    decision = autoscaling.decide(autoscaling.Policy.from_spec(dict(spec)), lag, current, history, now, pending)
    writer = runtime.status_writer(memo, PLURAL, body)
    fields.update(lag=lag, desiredReplicas=decision.replicas, inboxBacklog=work.inbox,
                  nextWakeUp=_timestamp(work.next_due_ms))
    if decision.replicas != current:
        await rt.kube.scale(namespace, name, decision.replicas)
        metrics.scaled(str(fn), current, decision.replicas)
        if current == 0:
            clock.scaled_from_zero(now)
        kopf.info(body, reason=_scale_reason(decision), message=decision.reason)
        fields.update(lastScaleTime=conditions.now(), lastScaleReason=decision.reason)
    await _trim_dead_letters(fn, dict(spec), memo, rt, now)
    fields.update(replicas=int(dep.status.replicas or 0) if dep.status else 0, readyReplicas=ready_pods)
    metrics.observe_function(str(fn), _resource(meta), lag=lag, desired=decision.replicas, ready=ready_pods,
                             inbox=work.inbox, next_due_ms=work.next_due_ms)
    await writer.update(int(memo["applied_generation"]), [_readiness(decision.replicas, ready_pods)], **fields)


def _wake_clock(memo: Any, body: kopf.Body) -> autoscaling.WakeClock:
    """Per function, seeded from the status an earlier operator (or leader) wrote."""
    clock = memo.get("wake_clock")
    if not isinstance(clock, autoscaling.WakeClock):
        recorded = (body.get("status") or {}).get("wakeUpSeconds")
        initial = constants.DEFAULT_WAKE_UP_S
        if isinstance(recorded, (int, float)) and recorded > 0:
            initial = float(recorded)
        clock = memo["wake_clock"] = autoscaling.WakeClock(initial)
    return clock


def _scale_reason(decision: autoscaling.Decision) -> str:
    if decision.woken_for_timer:
        return constants.REASON_WOKEN_FOR_TIMER
    return constants.REASON_SCALED_TO_ZERO if decision.replicas == 0 else constants.REASON_SCALED


def _timestamp(epoch_ms: int | None) -> str | None:
    if epoch_ms is None:
        return None
    moment = datetime.datetime.fromtimestamp(epoch_ms / 1000, datetime.UTC).replace(microsecond=0)
    return moment.isoformat().replace("+00:00", "Z")


def _readiness(desired: int, ready_pods: int) -> conditions.Condition:
    if desired == 0:
        return conditions.Condition(READY, True, constants.REASON_SCALED_TO_ZERO,
                                    "scaled to zero; messages queue and the first one brings a replica back")
    if ready_pods > 0:
        return conditions.Condition(READY, True, constants.REASON_AVAILABLE, f"{ready_pods}/{desired} replicas ready")
    return conditions.Condition(READY, False, constants.REASON_PROGRESSING, f"0/{desired} replicas ready")
