"""Every name and default the three planes and the chart must agree on, in one place.

The Helm chart and the CRDs mirror these values; a change here is a wire or storage format
change and must be treated as one.
"""

from __future__ import annotations

# ---- NATS subjects, streams and headers -------------------------------------------------------
SUBJECT_ROOT = "statefn"
INGRESS_TOKEN = "in"
CHANNEL_TOKEN = "ch"
DLQ_TOKEN = "dlq"
DLQ_STREAM = "STATEFN_DLQ"
# The dead-letter stream's retention: per function (its subject) at most this many letters, the oldest
# dropped first, and none older than this; a full DLQ never fills the disk under the platform.
DEFAULT_DLQ_MAX_PER_FUNCTION = 100_000
DEFAULT_DLQ_MAX_AGE_S = 30 * 24 * 3600

HEADER_MSG_ID = "Nats-Msg-Id"
HEADER_KIND = "Statefn-Kind"
HEADER_ORIGIN = "Statefn-Origin"
HEADER_ATTEMPT = "Statefn-Attempt"
HEADER_REPLY_TO = "Statefn-Reply-To"
HEADER_TRACEPARENT = "traceparent"

KIND_INVOKE = "invoke"
KIND_BUNDLE = "bundle"
KIND_DEAD_LETTER = "dead-letter"
ORIGIN_CLIENT = "client"
# nats-server's default max_payload (and the one serverconf/nats-server.conf sets): the largest message.
DEFAULT_NATS_MAX_PAYLOAD = 1024 * 1024
# Idempotency keys the platform makes itself (a message sent without one, a dead-letter replay) start
# with this; callers' keys may not, so a caller cannot claim one.
RESERVED_IDEMPOTENCY_PREFIX = "~"
# The handler name of a durable call's reply on its way back to the caller's partition (never a
# user handler: names starting with "~" are not valid Python identifiers).
RESPONSE_HANDLER = "~response"
# The call a durable ``ctx.sleep`` waits for: it goes nowhere; its timer answers it when due.
SLEEP_HANDLER = "~sleep"
# Two-phase commit's control messages: the coordinator's decision to a prepared participant, and a
# participant's question to a coordinator it has not heard from (answered by a decision).
COMMIT_HANDLER = "~commit"
ABORT_HANDLER = "~abort"
INQUIRE_HANDLER = "~inquire"
TX_CONTROL_HANDLERS = frozenset({COMMIT_HANDLER, ABORT_HANDLER, INQUIRE_HANDLER})

# ---- etcd layout ----------------------------------------------------------------------------------
ETCD_ROOT = "/statefn"

# ---- Defaults -------------------------------------------------------------------------------------
DEFAULT_PARTITIONS = 16
MAX_PARTITIONS = 1024
DEFAULT_MAX_STATE_BYTES = 256 * 1024
DEFAULT_MAX_ATTEMPTS = 5
# How long one handler run may take before it is abandoned (kind handler_timeout, retried like statefn.Retry).
DEFAULT_HANDLER_TIMEOUT_S = 60.0
# How long a durable call waits for its reply unless it says otherwise (then kind call_timeout).
DEFAULT_CALL_TIMEOUT_S = 600.0
DEFAULT_BACKOFF_INITIAL_S = 0.1
DEFAULT_BACKOFF_MAX_S = 30.0
DEFAULT_IDEMPOTENCY_TTL_S = 24 * 3600
DEFAULT_LEASE_TTL_S = 10
DEFAULT_ACK_WAIT_S = 30.0
DEFAULT_BATCH_SIZE = 128
DEFAULT_INVOKE_TIMEOUT_S = 30.0
# How long a transaction's coordinator waits for one participant's vote before it aborts, and how
# often a prepared participant that has heard no decision asks its coordinator.
DEFAULT_TX_TIMEOUT_S = 10.0

# etcd's own defaults (--max-txn-ops, --max-request-bytes); commits are split to stay under them.
ETCD_MAX_TXN_OPS = 128
ETCD_MAX_REQUEST_BYTES = 1536 * 1024

# ---- Kubernetes (mirrored by charts/statefn and crds/) -------------------------------------------
API_GROUP = "statefn.dev"
API_VERSION = "v1alpha1"
LABEL_FUNCTION = "statefn.dev/function"
LABEL_COMPONENT = "app.kubernetes.io/component"
FINALIZER = "statefn.dev/finalizer"
ANNOTATION_PREFIX = "statefn.dev"  # kopf's progress and last-handled-configuration annotations
FIELD_MANAGER = "statefn-operator"
MANAGED_BY = "statefn-operator"
DEFAULT_AUTOSCALE_INTERVAL_S = 5.0
# Waking a function from zero for a timer: how long a wake-up is assumed to take until one is measured
# (an image pull on a fresh node takes this long), and the slack added to the measured one.
DEFAULT_WAKE_UP_S = 30.0
WAKE_MARGIN_S = 2.0
# The operator's GET /metrics port in the chart (`statefn operator --metrics-port`; off unless given,
# so two operators on one host never collide). 8080 is its /healthz, which kopf serves alone.
OPERATOR_METRICS_PORT = 9090
# Events and conditions use these reasons; tests and dashboards match on them.
REASON_PROVISIONED = "Provisioned"
REASON_PROVISION_FAILED = "ProvisionFailed"
REASON_SCALED = "Scaled"
REASON_SCALED_TO_ZERO = "ScaledToZero"
REASON_WOKEN_FOR_TIMER = "WokenForTimer"
REASON_AVAILABLE = "Available"
REASON_PROGRESSING = "Progressing"
REASON_MISSING_FUNCTION = "MissingFunction"
REASON_PUBLISHED = "Published"
