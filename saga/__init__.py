"""choreosaga: choreographed sagas over Kafka.

Each service reacts to its sagas' events and, in ONE local transaction,
updates its state, records the incoming message in an inbox and writes its
outgoing events to an outbox; a relay publishes the outbox to Kafka. Every
message carries the saga's state stamp, and failures are compensated in
reverse step order.

Everything users need is exported here; other modules may change.
"""

from outbox import (
    InboxSettings,
    KafkaSettings,
    OutboxTables,
    RelaySettings,
    RetryPolicy,
    create_engine,
    ensure_topics,
)
from saga.codec import AvroCodec, DecodeLimits
from saga.commands import DurationArgument
from saga.context import MessageContext, RecordInfo, SagaContext
from saga.deadletter import DeadLetter
from saga.dlq import DeadLetterSelection, read_dead_letters, replay
from saga.embedded import EmbeddedBroker
from saga.envelope import Envelope
from saga.errors import (
    BrokerError,
    BusinessFailure,
    ChoreosagaError,
    ConfigurationError,
    DecodeError,
    EncodeError,
    HandlerError,
    IncompatibleSchemaError,
    SagaError,
    SchemaError,
)
from saga.observe import (
    ObserverSettings,
    SagaObserver,
    Trace,
    saga_status,
    trace_from_kafka,
    trace_from_log,
    trace_from_service,
)
from saga.schemas import SchemaRegistry
from saga.service import Service, ServiceSettings, ServiceStats
from saga.stamp import SagaStatus, Stamp, StepOutcome, StepRecord, Suspension
from saga.telemetry import configure_from_env, instrument

__all__ = [
    "AvroCodec",
    "BrokerError",
    "BusinessFailure",
    "ChoreosagaError",
    "ConfigurationError",
    "DeadLetter",
    "DeadLetterSelection",
    "DecodeError",
    "DecodeLimits",
    "DurationArgument",
    "EmbeddedBroker",
    "EncodeError",
    "Envelope",
    "HandlerError",
    "InboxSettings",
    "IncompatibleSchemaError",
    "KafkaSettings",
    "MessageContext",
    "ObserverSettings",
    "OutboxTables",
    "RecordInfo",
    "RelaySettings",
    "RetryPolicy",
    "SagaContext",
    "SagaError",
    "SagaObserver",
    "SagaStatus",
    "SchemaError",
    "SchemaRegistry",
    "Service",
    "ServiceSettings",
    "ServiceStats",
    "Stamp",
    "StepOutcome",
    "StepRecord",
    "Suspension",
    "Trace",
    "configure_from_env",
    "create_engine",
    "ensure_topics",
    "instrument",
    "read_dead_letters",
    "replay",
    "saga_status",
    "trace_from_kafka",
    "trace_from_log",
    "trace_from_service",
]
