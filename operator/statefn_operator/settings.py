"""What the operator is told at start: where the data plane is, and how it scales.

One frozen object, built from flags and ``STATEFN_*`` variables (the chart sets them), handed
to every handler through kopf's memo so no handler reads the environment itself.
"""

from __future__ import annotations

import pydantic

from statefn_core import constants


class Settings(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    nats_url: str
    etcd_endpoint: str
    # None: a function's own image also runs its sidecar (the one statefn image does both).
    sidecar_image: str | None = None
    # JetStream replicas of the streams the operator creates (the NATS cluster's size, up to 5).
    stream_replicas: int = pydantic.Field(default=1, ge=1, le=5)
    # How often each function's lag is read and its replicas decided.
    autoscale_interval: float = pydantic.Field(default=constants.DEFAULT_AUTOSCALE_INTERVAL_S, gt=0)
    # The operator's own OTEL_* environment, forwarded to every sidecar so one chart setting traces
    # every function (service name and resource attributes are set per function and pod).
    otel_env: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def otel_env_of(environ: dict[str, str]) -> tuple[tuple[str, str], ...]:
        return tuple(sorted((k, v) for k, v in environ.items() if k.startswith("OTEL_") and k != "OTEL_SERVICE_NAME"))
