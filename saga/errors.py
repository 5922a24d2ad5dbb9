"""Errors raised by ``saga``.

Every error raised on purpose by choreosaga derives from one root,
:class:`ChoreosagaError`::

    ChoreosagaError
    ├── OutboxError                     the storage layer (see ``outbox.errors``)
    │   ├── ConfigurationError
    │   ├── StoreError                  the database refused or lost a statement
    │   └── PublishError                a record could not be published
    │       └── MessageTooLargeError
    └── SagaError                       this package
        ├── ConfigurationError          bad settings or arguments (also a ValueError)
        ├── SchemaError                 a schema is missing, invalid or refused
        │   └── IncompatibleSchemaError a schema change breaks readers or writers
        ├── EncodeError                 a payload does not fit its schema
        ├── DecodeError                 bytes from the wire cannot be read; keeps them
        ├── BrokerError                 the Kafka broker is unreachable or refused a call
        ├── HandlerError                a handler failed (a bug, not a business outcome)
        └── BusinessFailure             a step refused: the saga is compensated

What an error means is data, not a class: ``error.kind`` is an
:class:`~outbox.failures.ErrorKind` (``OUTAGE``: wait as long as it lasts;
``TRANSIENT``: retry per policy; ``PERMANENT``: stop the message) and
``error.retriable`` says whether trying again may succeed. Errors from
aiokafka, SQLAlchemy and fastavro are translated where they are caught and
chained with ``from``; :func:`outbox.failures.classify` decides what a
foreign error means. A business failure (``ctx.fail``, or an exception type a
step declares with ``business_errors=``) is an outcome, not an error: the
step fails and the saga is compensated.
"""

from __future__ import annotations

from outbox.errors import ChoreosagaError
from outbox.failures import ErrorKind

__all__ = [
    "BrokerError",
    "BusinessFailure",
    "ChoreosagaError",
    "ConfigurationError",
    "DecodeError",
    "EncodeError",
    "HandlerError",
    "IncompatibleSchemaError",
    "SagaError",
    "SchemaError",
]


class SagaError(ChoreosagaError):
    """Root of the errors raised by ``saga``."""


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
        self.kind = ErrorKind.OUTAGE if retriable else ErrorKind.PERMANENT


class HandlerError(SagaError):
    """A message handler failed: a bug (or the event it emitted does not fit).

    The original exception, if any, is the ``__cause__``; the error's kind is
    that of the cause (a lost connection inside a handler is still an outage).
    """

    def __init__(
        self, message: str, *, kind: ErrorKind = ErrorKind.PERMANENT, role: str | None = None
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.role = role
        """Which handler failed: ``"step"``, ``"compensation"`` or ``"end"``."""


class BusinessFailure(SagaError):
    """A step refused as a business outcome (out of stock, card declined).

    Raise it from a step handler (or declare your own exception types with
    ``business_errors=`` when registering the step): the step is recorded as
    failed with this message as the reason, and the saga's completed steps are
    compensated. It is the exception form of ``ctx.fail(reason)``; raised by a
    compensation or an end handler it is a bug.
    """
