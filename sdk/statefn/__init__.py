"""statefn: stateful functions with exactly-once keyed state, sagas and transactions.

The public API; everything else lives in private modules.
"""

# isort: skip_file
from statefn_core.errors import (
    CallFailed,
    CodecError,
    DefinitionError,
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
from statefn._function import App, HandlerSpec, StatefulFunction
from statefn._client import Client

__all__ = [
    "App",
    "CallFailed",
    "Client",
    "CodecError",
    "Context",
    "DefinitionError",
    "HandlerSpec",
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
