"""The autoscaler's decisions, rule by rule (pure; the e2e suite scales real Deployments)."""

from __future__ import annotations

from statefn_operator import autoscaling, conditions

POLICY = autoscaling.Policy(min_replicas=1, max_replicas=4, partitions=8, target_lag=100,
                            scale_down_window=60, idle_before_zero=30)
TO_ZERO = autoscaling.Policy(min_replicas=0, max_replicas=4, partitions=8, target_lag=100,
                             scale_down_window=60, idle_before_zero=30)


def run(policy: autoscaling.Policy, steps: list[tuple[float, int]], start: int) -> list[int]:
    """Feed (time, lag) samples, applying each decision; returns the replicas after each."""
    history = autoscaling.History(steps[0][0], start)
    current, out = start, []
    for now, lag in steps:
        current = autoscaling.decide(policy, lag, current, history, now).replicas
        out.append(current)
    return out


def test_scale_up_is_immediate_and_capped_by_max_and_partitions() -> None:
    assert run(POLICY, [(0, 250)], 1) == [3]
    assert run(POLICY, [(0, 10_000)], 1) == [4]
    small = autoscaling.Policy(1, 16, 2, 100, 60, 30)
    decision = autoscaling.decide(small, 10_000, 1, autoscaling.History(0, 1), 0)
    assert decision.replicas == 2 and "capped by maxReplicas and partitions" in decision.reason


def test_scale_down_waits_for_the_window_and_takes_its_highest_recommendation() -> None:
    samples = [(0, 400), (10, 250), (20, 0), (50, 0), (70, 0), (81, 0)]
    # 4 at t=0; 3 and 1 are recommended, but 4 stays the window's highest until t=60 has passed.
    assert run(POLICY, samples, 1) == [4, 4, 4, 4, 3, 1]


def test_never_below_min_replicas() -> None:
    assert run(POLICY, [(0, 0), (1000, 0)], 1) == [1, 1]


def test_scale_to_zero_after_idle_period_and_back_on_first_message() -> None:
    samples = [(0, 50), (10, 0), (29, 0), (31, 0), (50, 0), (51, 1)]  # idle from the last lag seen, t=0
    assert run(TO_ZERO, samples, 1) == [1, 1, 1, 0, 0, 1]
    decision = autoscaling.decide(TO_ZERO, 0, 1, autoscaling.History(0, 1), 45)
    assert decision.replicas == 0 and "the next message brings one back" in decision.reason


def test_a_new_function_with_min_zero_stays_at_zero_until_a_message() -> None:
    assert run(TO_ZERO, [(0, 0), (100, 0), (101, 3)], 0) == [0, 0, 1]


def test_operator_restart_does_not_scale_down_before_a_window() -> None:
    history = autoscaling.History(0, 4)  # first seen at 4 replicas
    assert autoscaling.decide(POLICY, 0, 4, history, 1).replicas == 4
    assert autoscaling.decide(POLICY, 0, 4, history, 61).replicas == 1


def test_policy_defaults_from_a_defaulted_spec() -> None:
    policy = autoscaling.Policy.from_spec({"partitions": 8, "scaling": {"minReplicas": 0, "maxReplicas": 4,
                                                                        "scaleDownStabilizationSeconds": 120}})
    assert policy.idle_before_zero == 120 and policy.target_lag == 100 and policy.ceiling == 4


def test_condition_transition_time_changes_only_with_status() -> None:
    first = conditions.merge([], [conditions.Condition("Ready", False, "Progressing", "0/1")], 1)
    first[0]["lastTransitionTime"] = "2026-01-01T00:00:00Z"
    same = conditions.merge(first, [conditions.Condition("Ready", False, "Progressing", "0/2")], 2)
    assert same[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z" and same[0]["observedGeneration"] == 2
    flipped = conditions.merge(same, [conditions.Condition("Ready", True, "Available", "1/1")], 2)
    assert flipped[0]["lastTransitionTime"] != "2026-01-01T00:00:00Z" and flipped[0]["status"] == "True"
    both = conditions.merge(flipped, [conditions.Condition("Provisioned", None, "Waiting")], 2)
    assert [(c["type"], c["status"]) for c in both] == [("Provisioned", "Unknown"), ("Ready", "True")]


def timed(steps: list[tuple[float, int, float | None, int]], start: int, policy: autoscaling.Policy = TO_ZERO,
          lead: float = 10) -> list[autoscaling.Decision]:
    """Feed (time, lag, next timer's due time, inbox) samples, applying each decision."""
    history = autoscaling.History(steps[0][0], start)
    current, out = start, []
    for now, lag, due_at, inbox in steps:
        pending = autoscaling.Pending(inbox=inbox, due_in=None if due_at is None else due_at - now, wake_lead=lead)
        decision = autoscaling.decide(policy, lag, current, history, now, pending)
        current = decision.replicas
        out.append(decision)
    return out


def test_a_function_at_zero_is_woken_ahead_of_its_timer_and_goes_back_after() -> None:
    # A timer due at t=100, waking takes up to 10 s: woken at t=90, not before; idle 30 s after it fired.
    steps = [(0, 0, 100, 0), (50, 0, 100, 0), (89, 0, 100, 0), (90, 0, 100, 0), (95, 0, 100, 0),
             (100, 0, 100, 0), (101, 0, None, 0), (120, 0, None, 0), (131, 0, None, 0)]
    decisions = timed(steps, 0)
    assert [d.replicas for d in decisions] == [0, 0, 0, 1, 1, 1, 1, 1, 0]
    woke = decisions[3]
    assert woke.woken_for_timer and woke.reason == "a timer is due in 10s (waking takes up to 10s): waking 0 -> 1"
    assert not any(d.woken_for_timer for i, d in enumerate(decisions) if i != 3)
    assert "a timer is due in 5s" in decisions[4].reason


def test_an_overdue_timer_wakes_at_once() -> None:
    decision = timed([(0, 0, -30, 0)], 0)[0]
    assert decision.replicas == 1 and "overdue by 30s" in decision.reason


def test_not_scaled_to_zero_while_a_timer_is_due_sooner_than_a_wake_up() -> None:
    # Idle for long, but the next timer is 8 s away and waking takes 10 s: stays at 1 until it fires.
    decisions = timed([(0, 0, None, 0), (40, 0, 48, 0), (47, 0, 48, 0)], 1)
    assert [d.replicas for d in decisions] == [1, 1, 1]
    # A timer further away than a wake-up does not hold it: to zero, and the reason says when it comes back.
    far = timed([(0, 0, None, 0), (40, 0, 100, 0)], 1)
    assert [d.replicas for d in far] == [1, 0]
    assert "its next timer, due in 60s, wakes it 10s ahead" in far[1].reason


def test_inbox_backlog_counts_as_lag() -> None:
    decisions = timed([(0, 0, None, 250)], 1, POLICY)
    assert decisions[0].replicas == 3 and "lag 0 + 250 in inboxes" in decisions[0].reason
    from_zero = timed([(0, 0, None, 1)], 0)[0]
    assert from_zero.replicas == 1 and not from_zero.woken_for_timer  # a message waits: not for a timer
    # And it keeps a function from going to zero, like lag does.
    assert [d.replicas for d in timed([(0, 0, None, 3), (31, 0, None, 3), (40, 0, None, 0)], 1)] == [1, 1, 1]


def test_the_wake_clock_measures_from_scale_up_to_the_first_ready_pod() -> None:
    clock = autoscaling.WakeClock(30)
    assert clock.estimate == 30  # nothing measured yet
    assert clock.observe(5, ready=1) is None  # ready pods without a wake in progress: nothing to measure
    clock.scaled_from_zero(10)
    assert clock.observe(11, ready=0) is None
    assert clock.observe(14, ready=1) == 4
    assert clock.estimate == 4 and clock.observe(15, ready=1) is None
    clock.scaled_from_zero(20)
    clock.observe(27, ready=2)
    assert clock.estimate == 7  # the slowest of the recent wakes
