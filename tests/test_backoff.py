"""The one backoff every retry loop uses (statefn_core.backoff), in memory."""

from __future__ import annotations

import logging

import pytest

from statefn_core import backoff

_log = logging.getLogger("test.backoff")


class Flaky:
    def __init__(self, failures: int, exc: type[Exception] = ConnectionError) -> None:
        self.calls = 0
        self.failures = failures
        self.exc = exc

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc(f"down ({self.calls})")
        return "up"


def transient(exc: BaseException) -> bool:
    return isinstance(exc, ConnectionError)


async def test_transient_failures_are_waited_out_doubling_up_to_the_cap(caplog: pytest.LogCaptureFixture) -> None:
    flaky, retried = Flaky(4), []
    caplog.set_level(logging.WARNING, "test.backoff")
    # A lambda returning a coroutine, as call sites write it: awaited, not returned as a coroutine.
    got = await backoff.until_done(lambda: flaky(), transient=transient, first=0.01, cap=0.04, log=_log,
                                   what="reaching the thing", on_retry=lambda: retried.append(1))
    assert (got, flaky.calls, len(retried)) == ("up", 5, 4)
    waits = [r.getMessage().rsplit("retrying in ", 1)[1] for r in caplog.records]
    assert waits == ["0.01s", "0.02s", "0.04s", "0.04s"]
    assert "reaching the thing failed (ConnectionError: down (1)); retrying in" in caplog.text


async def test_anything_else_is_raised_at_once() -> None:
    flaky = Flaky(3, ValueError)
    with pytest.raises(ValueError, match=r"down \(1\)"):
        await backoff.until_done(flaky, transient=transient, first=0.001, cap=0.01, log=_log, what="x")
    assert flaky.calls == 1


def test_the_waits_double_from_first_to_cap() -> None:
    retrying = backoff.retrying(transient=transient, first=0.1, cap=0.5, log=_log, what="x")
    waits = [retrying.wait(_State(attempt)) for attempt in range(1, 6)]  # type: ignore[arg-type]
    assert waits == [0.1, 0.2, 0.4, 0.5, 0.5]


class _State:
    """What tenacity's wait strategies read of a retry's state."""

    def __init__(self, attempt_number: int) -> None:
        self.attempt_number = attempt_number
