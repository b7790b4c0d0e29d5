"""``ctx.saga()``: steps that each commit on their own, compensated in reverse order when the block fails.

A step is a durable call; its compensation (a handler of the same function and key, with its
own arguments) is recorded only once the step succeeded, since a failed step left no effects.
Recovery needs nothing of its own: the steps, the compensations and their replies are the
invocation's call journal, so a replay after a crash or a suspension rebuilds the same list
and resumes where the journal ends.
"""

from __future__ import annotations

import dataclasses
from types import TracebackType
from typing import TYPE_CHECKING, Any

from statefn_core import errors

if TYPE_CHECKING:
    from statefn import _context

STEP = "saga.step"
COMPENSATE = "saga.compensate"


@dataclasses.dataclass(frozen=True, slots=True)
class _Compensation:
    function: str
    key: str
    handler: str
    args: dict[str, Any]

    def __str__(self) -> str:
        return f"{self.function}({self.key!r}).{self.handler}"


class Saga:
    """Returned by ``ctx.saga()``; use it as ``async with``."""

    def __init__(self, ctx: _context.Context, compensation_rounds: int, compensation_backoff: float = 0.0) -> None:
        if compensation_rounds < 1:
            raise ValueError("compensation_rounds must be at least 1")
        if compensation_backoff < 0:
            raise ValueError("compensation_backoff must be >= 0 seconds")
        self._ctx = ctx
        self._rounds = compensation_rounds
        self._backoff = compensation_backoff
        self._done: list[_Compensation] = []

    async def call(self, function: str, key: str, handler: str, /, *,
                   compensate: tuple[str, dict[str, Any]] | None = None, timeout: float | None = None,
                   **args: Any) -> Any:
        """One step: ``ctx.call`` whose success registers ``compensate`` = (handler, arguments) to undo it.

        A step that times out (``timeout`` seconds) fails with kind ``call_timeout``; it may still
        run later, so its compensation is not recorded: give a step that can time out a way to be
        undone from the next step's failure, or no timeout.
        """
        reply = await self._ctx._call(function, key, handler, args, STEP, timeout=timeout)
        if compensate is not None:
            comp_handler, comp_args = compensate
            self._done.append(_Compensation(function, key, comp_handler, dict(comp_args)))
        return reply

    async def __aenter__(self) -> Saga:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool:
        # Only a failure compensates: not success, and not the unwinding at a call still waiting for its reply.
        if exc is None or not isinstance(exc, Exception):
            return False
        incomplete: list[str] = []
        for comp in reversed(self._done):
            last: errors.CallFailed | None = None
            for round_ in range(self._rounds):
                if round_ and self._backoff:  # a durable sleep between rounds: 1x, 2x, 4x ... the backoff
                    await self._ctx.sleep(self._backoff * 2 ** (round_ - 1))
                try:
                    await self._ctx._call(comp.function, comp.key, comp.handler, comp.args, COMPENSATE)
                    break
                except errors.CallFailed as err:
                    last = err
            else:
                assert last is not None
                incomplete.append(f"{comp} ({last.kind}: {last.message})")
        if incomplete:
            raise errors.SagaFailed(incomplete, exc) from exc
        return False  # compensated: the failure goes on to the handler (catch it around the block)
