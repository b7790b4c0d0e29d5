"""Fault injection for tests: make a commit or a publish succeed while the sidecar sees a failure.

Configured by ``STATEFN_FAULTS`` (e.g. ``commit_reply_lost=0.2,publish_ack_lost=0.2,seed=7``).
Off unless set; the hot path pays one attribute check.
"""

from __future__ import annotations

import logging
import os
import random

_log = logging.getLogger("statefn.faults")


class InjectedTimeout(TimeoutError):
    """Raised after the real operation succeeded, as a lost reply would look to the caller."""


class Faults:
    def __init__(self, spec: str = "") -> None:
        self.rates: dict[str, float] = {}
        seed = None
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, value = part.partition("=")
            if name == "seed":
                seed = int(value)
            else:
                self.rates[name] = float(value or 1)
        self._rng = random.Random(seed)
        self.fired: dict[str, int] = {}
        self.enabled = bool(self.rates)

    @classmethod
    def from_env(cls) -> Faults:
        return cls(os.environ.get("STATEFN_FAULTS", ""))

    def maybe(self, name: str) -> None:
        """Raise InjectedTimeout with the configured probability."""
        rate = self.rates.get(name)
        if rate and self._rng.random() < rate:
            self.fired[name] = self.fired.get(name, 0) + 1
            _log.warning("fault injected: %s (%d so far)", name, self.fired[name])
            raise InjectedTimeout(f"injected fault: {name}")


COMMIT_REPLY_LOST = "commit_reply_lost"
PUBLISH_ACK_LOST = "publish_ack_lost"
PUBLISH_REFUSED = "publish_refused"  # the publish fails before reaching NATS
ACK_LOST = "ack_lost"  # the ack of a committed message never reaches NATS: it is redelivered after ack_wait
