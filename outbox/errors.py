"""Errors raised by the ``outbox`` package.

Every error raised on purpose by this package derives from :class:`OutboxError`,
itself a :class:`ChoreosagaError`, the root shared with ``saga``::

    ChoreosagaError                 root of everything choreosaga raises on purpose
    ├── OutboxError (this package)
    │   ├── ConfigurationError        bad settings or table names (also a ValueError)
    │   ├── StoreError                the database refused or lost a statement
    │   └── PublishError              a record could not be published
    │       └── MessageTooLargeError  the record exceeds what the broker accepts
    └── SagaError (``saga.errors``)

What an error means is data, not a class: ``error.kind`` is an
:class:`~outbox.failures.ErrorKind` (an outage, a transient failure, or a
permanent one) and ``error.retriable`` says whether trying again later can
succeed. Errors from aiokafka and SQLAlchemy are translated at one boundary
each (``outbox.kafka`` and ``outbox.database``), classified by
:func:`outbox.failures.classify`, and chained with ``from``.
"""

from __future__ import annotations

from outbox.failures import ErrorKind

__all__ = [
    "ChoreosagaError",
    "ConfigurationError",
    "MessageTooLargeError",
    "OutboxError",
    "PublishError",
    "StoreError",
]


class ChoreosagaError(Exception):
    """Root of every error choreosaga raises on purpose (``outbox`` and ``saga``)."""

    kind: ErrorKind = ErrorKind.PERMANENT
    """What the failure means: an outage, a transient failure, or a permanent one."""

    @property
    def retriable(self) -> bool:
        """Whether the same operation may succeed if tried again later."""
        return self.kind.retriable


class OutboxError(ChoreosagaError):
    """Root of the errors raised by ``outbox``."""


class ConfigurationError(OutboxError, ValueError):
    """A setting, table name or argument is invalid."""


class StoreError(OutboxError):
    """The outbox or inbox tables could not be read or written."""

    def __init__(self, message: str, *, kind: ErrorKind = ErrorKind.PERMANENT) -> None:
        super().__init__(message)
        self.kind = kind


class PublishError(OutboxError):
    """A record could not be published to the broker."""

    def __init__(self, message: str, *, retriable: bool, kind: ErrorKind | None = None) -> None:
        super().__init__(message)
        if kind is None:
            kind = ErrorKind.TRANSIENT if retriable else ErrorKind.PERMANENT
        elif kind.retriable is not retriable:
            raise ValueError(f"a {kind.value} error cannot have retriable={retriable}")
        self.kind = kind


class MessageTooLargeError(PublishError):
    """The record is larger than the producer or the broker accepts."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retriable=False)
