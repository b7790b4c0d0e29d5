"""What was decided for one item of a batch: one type per decision, made by execution and participants.

The planner turns each decision into writes by matching on its type (``planner.Planner._share``),
so what an outcome does is said by what it is, never inferred from which fields happen to be set.
A decision is final once made; the only change after is the planner's ``failed`` for an outcome
whose effects cannot fit in any commit.

Decisions of a handler run: ``Replied``, ``Suspended``, ``Retrying``, ``Failed``. Of routing:
``Enqueued`` (its key is locked), ``Dropped`` (a reply nobody waits for), ``Noted`` (a reply to a
call in flight that the handler does not await yet). Of two-phase commit:
``Voted`` and ``Refused`` (a prepare), ``Decided`` (a decision for a prepared key), ``Answered``
(any other 2PC message), ``Reinquired`` (a prepared key's inquiry timer). Of timers: ``Fired`` (a
delayed send goes out). And ``Consumed`` for an item whose only effect is its own bookkeeping.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, ClassVar

from statefn_core import envelope, wire
from statefn_sidecar import assembly, items, keylocks, suspension, twophase


@dataclasses.dataclass(frozen=True, slots=True)
class Delayed:
    """A message sent at ``due_ms`` (a timer holds it until then)."""

    due_ms: int
    function: str
    message: envelope.Message


@dataclasses.dataclass(slots=True)
class Changes:
    """State writes and messages that take effect with the commit (``None`` deletes a state)."""

    state: dict[tuple[str, str], bytes | None] = dataclasses.field(default_factory=dict)
    sends: list[assembly.Send] = dataclasses.field(default_factory=list)
    delayed: list[Delayed] = dataclasses.field(default_factory=list)

    def decisions_only(self) -> Changes:
        """What a failed run still sends: the decisions of transactions it ended (their participants wait)."""
        return Changes(sends=[s for s in self.sends if s.message.is_tx_control])


class Decision:
    """Base of every decision; ``label`` is the outcome the metrics and spans report."""

    __slots__ = ()
    label: ClassVar[str]

    def answer(self) -> envelope.Reply | None:
        """The final reply (and idempotency record) this decision gives its caller, if it gives one."""
        return None

    def changes(self) -> Changes | None:
        """The state writes and messages it commits, if it has any."""
        return None

    def tx_event(self) -> str | None:
        """What a 2PC message did, for the participants' metrics."""
        return None


@dataclasses.dataclass(slots=True)
class Consumed(Decision):
    """Nothing but the item's own bookkeeping: a cancelled timer, an inquiry timer already decided."""

    label: ClassVar[str] = "control"


@dataclasses.dataclass(slots=True)
class Replied(Decision):
    """The handler returned: its state and messages commit with its reply."""

    label: ClassVar[str] = "ok"
    reply: envelope.Reply
    effects: Changes

    def answer(self) -> envelope.Reply:
        return self.reply

    def changes(self) -> Changes:
        return self.effects


@dataclasses.dataclass(slots=True)
class Suspended(Decision):
    """The handler waits at a durable call (or a sleep): the call goes out, the record says where it is."""

    label: ClassVar[str] = "suspended"
    record: suspension.Suspension
    effects: Changes

    def changes(self) -> Changes:
        return self.effects


@dataclasses.dataclass(slots=True)
class Noted(Decision):
    """The answer to one of several calls in flight, not the one the handler awaits: it is journaled
    in its slot (the record rewritten, its timeout timer cancelled) and nothing runs."""

    label: ClassVar[str] = "control"
    record: suspension.Suspension


@dataclasses.dataclass(slots=True)
class Retrying(Decision):
    """Another attempt at ``at_ms``.

    ``journal``: it resumes from there (kept in the key's suspension record meanwhile); ``None``:
    it starts from scratch. ``restart``: from scratch as a new invocation (an aborted transaction's
    run), its suspension record dropped and the decisions of transactions it ended sent.
    """

    label: ClassVar[str] = "retry"
    at_ms: int
    journal: suspension.Suspension | None = None
    restart: bool = False
    effects: Changes = dataclasses.field(default_factory=Changes)

    def changes(self) -> Changes:
        return self.effects


@dataclasses.dataclass(slots=True)
class Failed(Decision):
    """A terminal error: the caller gets it, the item goes to the dead letters, its effects are dropped.

    ``effects`` keeps only what must go out anyway (decisions of transactions it ended), and
    ``released`` a prepared record it still releases.
    """

    label: ClassVar[str] = "error"
    error: wire.ErrorInfo
    dead_letter: dict[str, Any]
    effects: Changes = dataclasses.field(default_factory=Changes)
    released: twophase.Prepared | None = None
    # A replay may resume from its journal (a handler's failure outside any transaction); else from the start.
    resumable: bool = False

    def answer(self) -> envelope.Reply:
        return envelope.Reply(ok=False, error=self.error)

    def changes(self) -> Changes:
        return self.effects


@dataclasses.dataclass(slots=True)
class Enqueued(Decision):
    """Its key is locked: it joins the key's inbox (its idempotency record says pending meanwhile)."""

    label: ClassVar[str] = "queued"
    entry: keylocks.Queued


@dataclasses.dataclass(slots=True)
class Dropped(Decision):
    """A reply nobody waits for any more; a yes vote among them gets an abort (``effects``) to release it."""

    label: ClassVar[str] = "dropped"
    effects: Changes = dataclasses.field(default_factory=Changes)
    event: str | None = None

    def changes(self) -> Changes:
        return self.effects

    def tx_event(self) -> str | None:
        return self.event


@dataclasses.dataclass(slots=True)
class Voted(Decision):
    """A prepare ran: its changes are staged in ``prepared`` (the key locked for the transaction), vote yes."""

    label: ClassVar[str] = "prepared"
    reply: envelope.Reply
    prepared: twophase.Prepared

    def answer(self) -> envelope.Reply:
        return self.reply

    def tx_event(self) -> str:
        return "prepared"


@dataclasses.dataclass(slots=True)
class Refused(Decision):
    """A prepare that may not wait for the older transaction holding its key (wait-die): it votes no."""

    label: ClassVar[str] = "control"
    reply: envelope.Reply

    def answer(self) -> envelope.Reply:
        return self.reply

    def tx_event(self) -> str:
        return "died"


@dataclasses.dataclass(slots=True)
class Decided(Decision):
    """A prepared key's transaction decided: the record goes; on commit its staged changes are applied."""

    label: ClassVar[str] = "control"
    prepared: twophase.Prepared
    event: str  # committed / aborted
    effects: Changes = dataclasses.field(default_factory=Changes)

    def changes(self) -> Changes:
        return self.effects

    def tx_event(self) -> str:
        return self.event


@dataclasses.dataclass(slots=True)
class Answered(Decision):
    """Any other 2PC message: a stale decision, an inquiry (answered with an abort in ``effects``, or pending)."""

    label: ClassVar[str] = "control"
    event: str
    effects: Changes = dataclasses.field(default_factory=Changes)

    def changes(self) -> Changes:
        return self.effects

    def tx_event(self) -> str:
        return self.event


@dataclasses.dataclass(slots=True)
class Reinquired(Decision):
    """A prepared key still has no decision: ask its coordinator (``effects``) and re-arm the timer."""

    label: ClassVar[str] = "control"
    prepared: twophase.Prepared  # with no timer: this commit arms a new one
    effects: Changes

    def changes(self) -> Changes:
        return self.effects

    def tx_event(self) -> str:
        return "inquired"


@dataclasses.dataclass(slots=True)
class Fired(Decision):
    """A delayed send is due: its message goes out."""

    label: ClassVar[str] = "control"
    effects: Changes

    def changes(self) -> Changes:
        return self.effects


@dataclasses.dataclass(slots=True)
class Outcome:
    """One item, what was decided for it, and what observing it needs (its span, when it started)."""

    item: items.Item
    decision: Decision = dataclasses.field(default_factory=Consumed)
    tx_decisions: list[str] = dataclasses.field(default_factory=list)  # "committed"/"aborted" (coordinators)
    started: float = dataclasses.field(default_factory=time.monotonic)  # for the latency histogram
    span: Any = None  # the invocation's span while tracing is on

    @property
    def invocation(self) -> items.Invocation:
        """The invocation this outcome is about; only outcomes of timers and dead letters have none."""
        if not isinstance(self.item, items.Invocation):
            raise TypeError(f"{type(self.item).__name__} {self.item.id} carries no invocation")
        return self.item

    @property
    def label(self) -> str:
        return self.decision.label


def failed(previous: Decision, error: wire.ErrorInfo, dead_letter: dict[str, Any]) -> Failed:
    """``previous`` turned into a terminal error, keeping what must go out anyway.

    The decisions of transactions it ended still go out (prepared participants wait for them),
    and a prepared record it was releasing is still released.
    """
    changes = previous.changes()
    return Failed(error, dead_letter, changes.decisions_only() if changes is not None else Changes(),
                  released=previous.prepared if isinstance(previous, Decided) else None)
