"""msgpack encoding of state values, handler arguments and replies.

Values go through a pydantic ``TypeAdapter`` of their declared type, so dataclasses, pydantic
models, lists and dicts of them round-trip; the msgpack layer only ever sees plain types.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import msgpack
import pydantic
import pydantic_core

from statefn_core import errors

T = TypeVar("T")


def pack(value: Any) -> bytes:
    """Encode plain values (the wire format of envelopes and already-dumped values)."""
    try:
        return msgpack.packb(value, use_bin_type=True, datetime=False)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise errors.CodecError(f"cannot encode {type(value).__name__} with msgpack: {exc}") from exc


# Arguments nested deeper than this are refused where they come in (the gateway, a message's decoding):
# handlers, msgpack, pydantic and the request fingerprint all recurse on them.
MAX_DEPTH = 64


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether lists and maps nest deeper than ``limit`` (checked without recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list | tuple):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in node)
    return False


def unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise errors.CodecError(f"undecodable msgpack payload: {exc}") from exc


_ADAPTERS: dict[Any, pydantic.TypeAdapter[Any]] = {}


def _adapter(tp: Any) -> pydantic.TypeAdapter[Any]:
    """TypeAdapters are costly to build and types are few: keep one per type."""
    adapter = _ADAPTERS.get(tp)
    if adapter is None:
        adapter = _ADAPTERS[tp] = pydantic.TypeAdapter(tp)
    return adapter


def to_plain(value: Any) -> Any:
    """Dump pydantic models and dataclasses (at any depth) to msgpack-native values."""
    if value is None or isinstance(value, str | int | float | bool | bytes):
        return value
    try:
        return _adapter(type(value)).dump_python(value, mode="python")
    except pydantic.PydanticSchemaGenerationError as exc:
        raise errors.CodecError(f"cannot encode values of type {type(value).__name__}") from exc


class Codec(Generic[T]):
    """Encodes and decodes values of one declared type."""

    __slots__ = ("_adapter", "type")

    def __init__(self, tp: type[T] | Any) -> None:
        self.type = tp
        try:
            self._adapter = _adapter(tp)
        except pydantic.PydanticSchemaGenerationError as exc:
            raise errors.DefinitionError(f"type {tp!r} cannot be encoded: {exc}") from exc

    def encode(self, value: T) -> bytes:
        try:
            # warnings="error": a value of another type than declared is refused here, not committed
            # and then unreadable at every later decode.
            plain = self._adapter.dump_python(value, mode="python", warnings="error")
        except pydantic_core.PydanticSerializationError as exc:
            raise errors.CodecError(f"cannot encode {value!r} as {self.type!r}: {exc}") from exc
        return pack(plain)

    def decode(self, data: bytes) -> T:
        return self.validate(unpack(data))

    def validate(self, plain: Any) -> T:
        try:
            return self._adapter.validate_python(plain)  # type: ignore[no-any-return]
        except pydantic.ValidationError as exc:
            raise errors.CodecError(f"stored value does not match {self.type!r}: {exc}") from exc
