"""Errors raised by ``saga``.

Every error raised on purpose by this package derives from :class:`SagaError`::

    SagaError
    ├── ConfigurationError          bad settings or arguments (also a ValueError)
    ├── SchemaError                 a schema is missing, invalid or refused
    │   └── IncompatibleSchemaError a schema change breaks readers or writers
    ├── EncodeError                 a payload does not fit its schema
    ├── DecodeError                 bytes from the wire cannot be read; keeps them
    ├── BrokerError                 the Kafka broker is unreachable or refused a call
    └── HandlerError                a message handler failed

Retryability is data, not a class: ``error.retriable`` says whether the same
operation may succeed if tried again later. Errors from aiokafka, SQLAlchemy and
fastavro are translated where they are caught and chained with ``from``;
``outbox`` keeps its own root (:class:`outbox.OutboxError`) because it knows
nothing about sagas.
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "ConfigurationError",
    "DecodeError",
    "EncodeError",
    "HandlerError",
    "IncompatibleSchemaError",
    "SagaError",
    "SchemaError",
]


class SagaError(Exception):
    """Root of the errors raised by ``saga``."""

    retriable: bool = False
    """Whether the same operation may succeed if tried again later."""


class ConfigurationError(SagaError, ValueError):
    """A setting or argument is invalid."""


class SchemaError(SagaError):
    """A schema is missing, malformed, or refused (for example, recursive)."""


class IncompatibleSchemaError(SchemaError):
    """A new version of a schema cannot read, or be read by, an older one."""


class EncodeError(SagaError):
    """A payload could not be encoded with its schema."""


class DecodeError(SagaError):
    """Bytes from the wire could not be decoded.

    The raw bytes are kept on the error so that nothing is lost: log them, or
    route them to a dead-letter topic.
    """

    def __init__(self, message: str, *, raw: bytes | None) -> None:
        super().__init__(message)
        self.raw = raw
        """The bytes that failed to decode, exactly as received."""


class BrokerError(SagaError):
    """The Kafka broker could not be reached or refused a request."""

    def __init__(self, message: str, *, retriable: bool = True) -> None:
        super().__init__(message)
        self.retriable = retriable


class HandlerError(SagaError):
    """A message handler raised; the original exception is the ``__cause__``."""

    def __init__(self, message: str, *, retriable: bool = False, role: str | None = None) -> None:
        super().__init__(message)
        self.retriable = retriable
        self.role = role
        """Which handler failed: ``"step"``, ``"compensation"`` or ``"end"``."""
