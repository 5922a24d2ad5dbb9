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
from saga.codec import AvroCodec
from saga.context import MessageContext, RecordInfo, SagaContext
from saga.embedded import EmbeddedBroker
from saga.envelope import Envelope
from saga.errors import (
    BrokerError,
    ChoreosagaError,
    ConfigurationError,
    DecodeError,
    EncodeError,
    HandlerError,
    IncompatibleSchemaError,
    SagaError,
    SchemaError,
)
from saga.schemas import SchemaRegistry
from saga.service import Service, ServiceSettings, ServiceStats
from saga.stamp import SagaStatus, Stamp, StepOutcome, StepRecord

__all__ = [
    "AvroCodec",
    "BrokerError",
    "ChoreosagaError",
    "ConfigurationError",
    "DecodeError",
    "EmbeddedBroker",
    "EncodeError",
    "Envelope",
    "HandlerError",
    "InboxSettings",
    "IncompatibleSchemaError",
    "KafkaSettings",
    "MessageContext",
    "OutboxTables",
    "RecordInfo",
    "RelaySettings",
    "RetryPolicy",
    "SagaContext",
    "SagaError",
    "SagaStatus",
    "SchemaError",
    "SchemaRegistry",
    "Service",
    "ServiceSettings",
    "ServiceStats",
    "Stamp",
    "StepOutcome",
    "StepRecord",
    "create_engine",
    "ensure_topics",
]
