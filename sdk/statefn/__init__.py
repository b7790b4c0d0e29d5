"""statefn: stateful functions with exactly-once keyed state, sagas and transactions.

The public API; everything else lives in private modules. ``pip install statefn`` is what handler
code needs (msgpack, pydantic, the OpenTelemetry API); ``statefn.Client`` needs the client extra
and is imported on first use, so handler code never loads NATS or etcd clients.
"""

# isort: skip_file
from typing import TYPE_CHECKING, Any

from statefn_core.errors import (
    CallFailed,
    CodecError,
    DefinitionError,
    ErrorKind,
    InvalidCall,
    InvalidFunctionType,
    InvocationFailed,
    InvocationTimeout,
    PayloadTooLarge,
    ReplayDiverged,
    Retry,
    SagaFailed,
    StateTooLarge,
    StatefnError,
    TransactionAborted,
    UnknownFunction,
)
from statefn._state import StateSpec
from statefn._saga import Saga
from statefn._transaction import Transaction
from statefn._context import Context
from statefn._function import App, StatefulFunction

if TYPE_CHECKING:
    from statefn._client import Client

__all__ = [
    "App",
    "CallFailed",
    "Client",
    "CodecError",
    "Context",
    "DefinitionError",
    "ErrorKind",
    "InvalidCall",
    "InvalidFunctionType",
    "InvocationFailed",
    "InvocationTimeout",
    "PayloadTooLarge",
    "ReplayDiverged",
    "Retry",
    "Saga",
    "SagaFailed",
    "StateSpec",
    "StateTooLarge",
    "StatefnError",
    "StatefulFunction",
    "Transaction",
    "TransactionAborted",
    "UnknownFunction",
]


def __getattr__(name: str) -> Any:
    if name == "Client":
        try:
            from statefn._client import Client
        except ModuleNotFoundError as exc:
            raise ImportError(f"statefn.Client needs the client extra (missing module {exc.name!r}): "
                              "pip install 'statefn[client]'", name=exc.name) from exc
        return Client
    raise AttributeError(f"module 'statefn' has no attribute {name!r}")
