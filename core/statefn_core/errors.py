"""The exceptions users raise and catch.

A handler raises :class:`Retry` to be retried with backoff; any other exception is terminal.
Callers outside the platform get :class:`InvocationFailed` carrying the error the handler (or
the platform) reported, with a machine-readable ``kind``.
"""

from __future__ import annotations

import enum
from typing import Any


class StatefnError(Exception):
    """Base of every error statefn raises."""


class InvalidFunctionType(StatefnError, ValueError):
    """A function type is not ``namespace/name`` with DNS-label parts."""


class DefinitionError(StatefnError, TypeError):
    """A function, handler or state spec is declared wrongly (caught at import time)."""


class Retry(StatefnError):
    """Raise from a handler to have the invocation retried with backoff.

    State changes of the failed attempt are dropped. After the function's ``max_attempts`` the
    message goes to the dead-letter subject and the caller gets the last error.
    """

    def __init__(self, message: str = "retry requested", *, after: float | None = None) -> None:
        super().__init__(message)
        self.after = after


class StateTooLarge(StatefnError):
    """A state value's encoding exceeds the configured limit; nothing is written."""


class CodecError(StatefnError, TypeError):
    """A value cannot be encoded or decoded with msgpack and its declared type."""


class ErrorKind(enum.StrEnum):
    """Why an invocation failed, as every caller sees it.

    It is ``kind`` on :class:`CallFailed` and :class:`InvocationFailed`, ``error.kind`` in the
    gateway's answers and in dead letters. Members are strings, so ``exc.kind ==
    ErrorKind.CALL_TIMEOUT`` and ``exc.kind == "call_timeout"`` say the same; a kind this version
    does not know (from a newer peer) still arrives, as a plain string.
    """

    HANDLER = "handler_error"                # the handler raised (not statefn.Retry)
    HANDLER_TIMEOUT = "handler_timeout"      # the handler ran past its function's handler timeout: abandoned
    RETRIES_EXHAUSTED = "retries_exhausted"  # it raised statefn.Retry on every attempt
    UNKNOWN_HANDLER = "unknown_handler"
    UNKNOWN_FUNCTION = "unknown_function"
    INVALID_ARGUMENT = "invalid_argument"    # the arguments do not match the handler's signature
    STATE_TOO_LARGE = "state_too_large"      # a state value, or all its effects, over the limits
    UNDECODABLE = "undecodable"              # the message itself could not be read
    CALL_TIMEOUT = "call_timeout"            # a durable call's reply did not arrive within its timeout
    CALL_CYCLE = "call_cycle"                # a durable call to a key that waits on the caller: it could never run
    TX_CONFLICT = "tx_conflict"              # wait-die: an older transaction holds the participant's key
    TX_TIMEOUT = "tx_timeout"                # a participant's vote did not arrive within the transaction's timeout
    PAYLOAD_TOO_LARGE = "payload_too_large"  # the request is larger than NATS (or the gateway) accepts
    TIMEOUT = "timeout"                      # the caller stopped waiting (the gateway's 504); it may still run
    IDEMPOTENCY_MISMATCH = "idempotency_mismatch"  # its idempotency key was used for a different request


class InvocationFailed(StatefnError):
    """What a caller sees when the invocation ended in an error (terminal or after retries)."""

    def __init__(self, kind: str, message: str, *, error_type: str = "", details: Any = None) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.error_type = error_type
        self.details = details


class CallFailed(StatefnError):
    """Raised by ``await ctx.call(...)`` when the called invocation ended in an error.

    The callee's effects were dropped (or it never ran); the caller decides: catch it and go on,
    compensate, or let it propagate (a terminal failure of the caller, like any other exception).
    """

    def __init__(self, kind: str, message: str, *, error_type: str = "", target: str = "") -> None:
        super().__init__(f"{target}: {kind}: {message}" if target else f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.error_type = error_type
        self.target = target


class TransactionAborted(CallFailed):
    """Raised by ``await tx.call(...)`` when the transaction cannot go on, and out of its block.

    ``kind`` says why: ``tx_conflict`` (an older transaction holds the participant's key; by
    wait-die the younger one gives way) or ``tx_timeout`` (no vote within the timeout). The
    transaction is then doomed: it aborts at the end of its block even if the error is caught
    inside, and every prepared participant is released.

    Let it propagate: when the transaction was the invocation's only durable work, the platform
    runs the invocation again from the start, with backoff, after it ended and unlocked its key
    (a loop inside the handler would keep the key locked, and an older transaction waiting for
    it would wait until its timeout). Otherwise it is a terminal error, like any exception.
    """


class SagaFailed(StatefnError):
    """A saga failed and some of its compensations could not be completed either.

    ``incomplete`` names each compensation that still failed after its rounds, with its last
    error; the saga's own failure is the ``__cause__``. Raised from the handler, it is a terminal
    error: the caller gets it and the message is dead-lettered with it, so nothing is lost silently.
    """

    def __init__(self, incomplete: list[str], cause: BaseException) -> None:
        super().__init__(f"the saga failed ({type(cause).__name__}: {cause}) and {len(incomplete)} "
                         f"compensation(s) did not complete: {'; '.join(incomplete)}")
        self.incomplete = incomplete


class ReplayDiverged(StatefnError):
    """A replayed handler did something else than its journal recorded (non-deterministic code)."""


class InvalidCall(StatefnError, ValueError):
    """A call that can never complete, refused at the call site (e.g. a key calling itself)."""


class Suspended(BaseException):
    """Internal: unwinds a handler at a call whose reply has not arrived yet.

    A BaseException, so a handler's ``except Exception`` does not swallow it. The sidecar
    commits the call and, when the reply comes, runs the handler again from the start, feeding
    it the journaled replies: handlers must be deterministic between calls.
    """


class PayloadTooLarge(StatefnError, ValueError):
    """The encoded request is larger than the NATS server accepts (``max_payload``)."""


class InvocationTimeout(StatefnError, TimeoutError):
    """No reply arrived in time, even after re-sending with the same idempotency key."""


class UnknownFunction(StatefnError, LookupError):
    """The function type is not registered (no sidecar ever announced it)."""
