"""Sidecar settings: flags and ``STATEFN_*`` environment variables, validated by pydantic."""

from __future__ import annotations

import uuid

import pydantic

from statefn_core import constants


class SidecarConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    nats_url: str = "nats://127.0.0.1:4222"
    etcd_endpoint: str = "127.0.0.1:2379"
    member_id: str = pydantic.Field(default_factory=lambda: uuid.uuid4().hex[:12])
    # Empty: every function the app defines. A Deployment hosts one function type, so it can
    # scale on that function's own lag even when the image's app defines several.
    functions: tuple[str, ...] = ()
    # None: each function's own policy from its code (StatefulFunction(max_attempts=...)).
    max_attempts: int | None = pydantic.Field(default=None, ge=1)
    # None: each function's own (StatefulFunction(handler_timeout=...)); the spec's handlerTimeoutSeconds.
    handler_timeout: float | None = pydantic.Field(default=None, gt=0)
    # None: the count the function was created with (or the default for a new function).
    partitions: int | None = pydantic.Field(default=None, ge=1, le=constants.MAX_PARTITIONS)
    lease_ttl: int = pydantic.Field(default=constants.DEFAULT_LEASE_TTL_S, ge=1)
    ack_wait: float = pydantic.Field(default=constants.DEFAULT_ACK_WAIT_S, gt=0)
    batch_size: int = pydantic.Field(default=constants.DEFAULT_BATCH_SIZE, ge=1, le=1000)
    fetch_timeout: float = pydantic.Field(default=1.0, gt=0)
    max_state_bytes: int = pydantic.Field(default=constants.DEFAULT_MAX_STATE_BYTES, ge=1)
    idempotency_ttl: int = pydantic.Field(default=constants.DEFAULT_IDEMPOTENCY_TTL_S, ge=60)
    max_cached_keys: int = pydantic.Field(default=200_000, ge=0)
    rebalance_interval: float = pydantic.Field(default=0.5, gt=0)
    gap_retry_delay: float = pydantic.Field(default=1.0, gt=0)
