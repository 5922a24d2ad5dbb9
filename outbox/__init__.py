"""Transactional messaging storage: outbox, inbox and relay.

Write outgoing messages in the same database transaction as your state
change (:meth:`SqlOutboxStore.add`), let a :class:`Relay` publish them to
Kafka, and deduplicate incoming messages with :class:`SqlInboxStore` inside
the handler's transaction. This package knows nothing about sagas.
"""

from outbox.database import configure_sqlite, create_engine, is_transient_db_error
from outbox.errors import (
    ChoreosagaError,
    ConfigurationError,
    MessageTooLargeError,
    OutboxError,
    PublishError,
    StoreError,
)
from outbox.failures import ErrorKind, classify
from outbox.inbox import InboxStore, SqlInboxStore
from outbox.kafka import KafkaPublisher, ensure_topics
from outbox.message import Header, OutboxMessage, ParkedMessage, StoredMessage
from outbox.publisher import MemoryPublisher, PublishedRecord, Publisher
from outbox.relay import Relay, RelayStats
from outbox.retry import RetryPolicy
from outbox.settings import InboxSettings, KafkaSettings, RelaySettings
from outbox.store import OutboxStats, OutboxStore, SqlOutboxStore, Transaction
from outbox.tables import OutboxTables

__all__ = [
    "ChoreosagaError",
    "ConfigurationError",
    "ErrorKind",
    "Header",
    "InboxSettings",
    "InboxStore",
    "KafkaPublisher",
    "KafkaSettings",
    "MemoryPublisher",
    "MessageTooLargeError",
    "OutboxError",
    "OutboxMessage",
    "OutboxStats",
    "OutboxStore",
    "OutboxTables",
    "ParkedMessage",
    "PublishError",
    "PublishedRecord",
    "Publisher",
    "Relay",
    "RelaySettings",
    "RelayStats",
    "RetryPolicy",
    "SqlInboxStore",
    "SqlOutboxStore",
    "StoreError",
    "StoredMessage",
    "Transaction",
    "classify",
    "configure_sqlite",
    "create_engine",
    "ensure_topics",
    "is_transient_db_error",
]
