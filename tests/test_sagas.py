"""Sagas: ``async with ctx.saga()``; steps commit on their own, compensations run in reverse on failure.

On real nats-server and etcd, embedded: a completed saga compensates nothing; a failed step, or a
failure of the caller's own code, undoes the steps done in reverse order; a compensation that
fails for a while is tried again; one that keeps failing is reported in SagaFailed after the
others still ran.
"""

from __future__ import annotations

import collections
import time

import pytest

import statefn
from statefn import Context, StatefulFunction
from tests import helpers


class Travel:
    def __init__(self, ns: str) -> None:
        self.undone: list[str] = []  # compensations in the order they ran (embedded: same process)
        self.cancel_failures: collections.Counter[str] = collections.Counter()
        self.functions: dict[str, str] = {}
        services = [self._service(ns, name) for name in ("hotel", "flight", "car")]

        trip = StatefulFunction(f"{ns}/trip")
        status = trip.state("status", str, default="new")
        self.trip = str(trip.type)
        f = self.functions

        @trip.handler
        async def plan(ctx: Context, car_fails: bool = False, own_failure: bool = False, rounds: int = 5,
                       backoff: float = 0.0) -> str:
            try:
                async with ctx.saga(compensation_rounds=rounds, compensation_backoff=backoff) as saga:
                    await saga.call(f["hotel"], "paris", "book", trip=ctx.key, compensate=("cancel", {"trip": ctx.key}))
                    await saga.call(f["flight"], "cdg", "book", trip=ctx.key, compensate=("cancel", {"trip": ctx.key}))
                    if own_failure:
                        raise RuntimeError("the trip's own code broke")
                    await saga.call(f["car"], "paris", "book", trip=ctx.key, fail=car_fails)
            except statefn.CallFailed as exc:
                ctx[status] = "cancelled"
                return f"cancelled: {exc.message}"
            ctx[status] = "booked"
            return "booked"

        self.app = statefn.App(*services, trip)

    def _service(self, ns: str, name: str) -> StatefulFunction:
        """A bookable service: ``book`` adds the trip to its bookings, ``cancel`` (the compensation) removes it."""
        fn = StatefulFunction(f"{ns}/{name}", max_attempts=2, backoff_initial=0.05)
        bookings = fn.state("bookings", list[str], default=[])
        self.functions[name] = str(fn.type)

        @fn.handler
        async def book(ctx: Context, trip: str, fail: bool = False) -> str:
            if fail:
                raise ValueError(f"no {name} available")
            ctx[bookings].append(trip)
            return f"{name} {ctx.key}"

        @fn.handler
        async def cancel(ctx: Context, trip: str) -> None:
            if self.cancel_failures[name] > 0:
                self.cancel_failures[name] -= 1
                raise statefn.Retry(f"{name} desk busy")
            ctx[bookings].remove(trip)
            self.undone.append(name)

        return fn

    async def bookings(self, c: statefn.Client, service: str, key: str) -> list[str]:
        return list((await c.get_state(self.functions[service], key)).get("bookings", []))


@pytest.fixture
async def travel(nats_server, etcd_server, namespace):
    t = Travel(namespace)
    async with helpers.running_sidecar(t.app, nats_server, etcd_server), \
            helpers.client(nats_server, etcd_server, timeout=20) as c:
        yield t, c


async def test_a_completed_saga_compensates_nothing(travel) -> None:
    t, c = travel
    assert await c.invoke(t.trip, "t1", "plan") == "booked"
    assert await t.bookings(c, "hotel", "paris") == ["t1"]
    assert await t.bookings(c, "flight", "cdg") == ["t1"]
    assert await t.bookings(c, "car", "paris") == ["t1"]
    assert t.undone == []


async def test_a_failed_step_undoes_the_done_steps_in_reverse(travel) -> None:
    t, c = travel
    assert await c.invoke(t.trip, "t2", "plan", car_fails=True) == "cancelled: no car available"
    assert t.undone == ["flight", "hotel"]
    assert await c.get_state(t.trip, "t2") == {"status": "cancelled"}
    for service, key in (("hotel", "paris"), ("flight", "cdg"), ("car", "paris")):
        assert await t.bookings(c, service, key) == [], service


async def test_a_failure_of_the_callers_own_code_compensates_and_fails_the_invocation(travel) -> None:
    t, c = travel
    with pytest.raises(statefn.InvocationFailed) as err:
        await c.invoke(t.trip, "t3", "plan", own_failure=True)
    assert (err.value.kind, err.value.error_type, err.value.message) == (
        "handler_error", "RuntimeError", "the trip's own code broke")
    assert t.undone == ["flight", "hotel"]
    assert await t.bookings(c, "hotel", "paris") == [] and await t.bookings(c, "flight", "cdg") == []
    assert await c.get_state(t.trip, "t3") == {}  # the failed invocation's own state was dropped


async def test_a_compensation_that_fails_for_a_while_is_tried_again(travel) -> None:
    t, c = travel
    t.cancel_failures["flight"] = 3  # more than the flight's own max_attempts (2): two rounds fail, the third works
    assert await c.invoke(t.trip, "t4", "plan", car_fails=True) == "cancelled: no car available"
    assert t.undone == ["flight", "hotel"] and t.cancel_failures["flight"] == 0
    assert await t.bookings(c, "flight", "cdg") == []


async def test_compensation_rounds_can_wait_a_durable_backoff(travel) -> None:
    t, c = travel
    t.cancel_failures["flight"] = 4  # two rounds of two attempts fail: 0.4 s and 0.8 s of sleep before the next
    started = time.monotonic()
    assert await c.invoke(t.trip, "t6", "plan", car_fails=True, backoff=0.4) == "cancelled: no car available"
    assert time.monotonic() - started >= 1.2
    assert t.undone == ["flight", "hotel"] and await t.bookings(c, "flight", "cdg") == []


async def test_a_compensation_that_keeps_failing_is_reported_and_the_others_still_run(travel) -> None:
    t, c = travel
    t.cancel_failures["flight"] = 100
    with pytest.raises(statefn.InvocationFailed) as err:
        await c.invoke(t.trip, "t5", "plan", car_fails=True, rounds=2)
    assert err.value.error_type == "SagaFailed"
    assert err.value.message == (
        "the saga failed (CallFailed: " + t.functions["car"] + "('paris').book: handler_error: no car available) "
        "and 1 compensation(s) did not complete: " + t.functions["flight"] + "('cdg').cancel "
        "(retries_exhausted: gave up after 2 attempts: flight desk busy)")
    assert t.undone == ["hotel"]
    assert await t.bookings(c, "flight", "cdg") == ["t5"] and await t.bookings(c, "hotel", "paris") == []
