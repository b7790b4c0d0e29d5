"""The operator's metric helpers, without a cluster (e2e/test_operator_metrics.py serves them from a real operator)."""

from __future__ import annotations

import prometheus_client
import pytest

from statefn_operator import metrics


def sample(name: str, **labels: str) -> float | None:
    return prometheus_client.REGISTRY.get_sample_value(name, labels)


@pytest.mark.parametrize(("current", "target", "expected"), [
    (1, 3, "up"), (3, 2, "down"), (2, 0, "to_zero"), (0, 1, "from_zero"), (0, 3, "from_zero"), (2, 2, None),
    (0, 0, None)])
def test_direction(current: int, target: int, expected: str | None) -> None:
    assert metrics.direction(current, target) == expected


def test_reconciles_count_outcomes_and_time_both() -> None:
    before_ok = sample("statefn_operator_reconciles_total", kind="Workflow", outcome="ok") or 0
    before_error = sample("statefn_operator_reconciles_total", kind="Workflow", outcome="error") or 0
    timed = sample("statefn_operator_reconcile_duration_seconds_count", kind="Workflow") or 0
    with metrics.reconciling(metrics.KIND_WORKFLOW):
        pass
    with pytest.raises(RuntimeError), metrics.reconciling(metrics.KIND_WORKFLOW):
        raise RuntimeError("data plane down")
    assert sample("statefn_operator_reconciles_total", kind="Workflow", outcome="ok") == before_ok + 1
    assert sample("statefn_operator_reconciles_total", kind="Workflow", outcome="error") == before_error + 1
    assert sample("statefn_operator_reconcile_duration_seconds_count", kind="Workflow") == timed + 2


def test_forget_drops_every_series_of_one_function_only() -> None:
    metrics.observe_function("unit/a", "ns/a", lag=7, desired=2, ready=1)
    metrics.observe_function("unit/b", "ns/b", lag=1, desired=1, ready=1)
    metrics.scaled("unit/a", 1, 2)
    metrics.scaled("unit/a", 2, 2)  # no change: not a decision
    assert sample("statefn_function_lag", function="unit/a", resource="ns/a") == 7
    assert sample("statefn_operator_scale_decisions_total", function="unit/a", direction="up") == 1
    metrics.forget_function("unit/a", "ns/a")
    metrics.forget_function("unit/a", "ns/a")  # the daemon and the delete handler both do it
    text = prometheus_client.generate_latest().decode()
    assert 'function="unit/a"' not in text
    assert sample("statefn_function_lag", function="unit/b", resource="ns/b") == 1
    metrics.forget_function("unit/b", "ns/b")
