"""State specs: each piece of per-key state is declared up front with a type and a default.

Declaring state (as StateFun's ``ValueSpec`` does) lets the sidecar load exactly what a
function uses and lets the operator and tools know the etcd layout without running user code.
"""

from __future__ import annotations

import copy
import dataclasses
import keyword
import re
from typing import Any, Generic, TypeVar

from statefn_core import codec, errors

T = TypeVar("T")
_STATE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclasses.dataclass(frozen=True, eq=False)
class StateSpec(Generic[T]):
    """One named, typed value kept per key; use it as ``ctx[spec]``."""

    function: str
    name: str
    type: Any
    default: T
    codec: codec.Codec[T] = dataclasses.field(repr=False)

    @classmethod
    def declare(cls, function: str, name: str, tp: type[T] | Any, default: T) -> StateSpec[T]:
        if not _STATE_NAME.match(name) or keyword.iskeyword(name):
            raise errors.DefinitionError(
                f"state name {name!r} of {function}: use a lower-case identifier (a-z, 0-9, '_')"
            )
        value_codec: codec.Codec[T] = codec.Codec(tp)
        if default is not None:
            value_codec.encode(default)  # fail at import time, not at the first invocation
        return cls(function=function, name=name, type=tp, default=default, codec=value_codec)

    def fresh_default(self) -> T:
        """A copy, so a mutable default (a list, a dict) is never shared between keys."""
        return copy.deepcopy(self.default)
