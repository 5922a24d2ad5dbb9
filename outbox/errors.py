"""Errors raised by the ``outbox`` package.

Every error raised on purpose by this package derives from :class:`OutboxError`::

    OutboxError
    ├── ConfigurationError        bad settings or table names (also a ValueError)
    ├── StoreError                the database refused or lost a statement
    └── PublishError              a record could not be published
        └── MessageTooLargeError  the record exceeds what the broker accepts

Retryability is data, not a class: ``error.retriable`` says whether trying the
same thing again later can succeed (a broker outage) or not (a record that is
too large). Errors from aiokafka and SQLAlchemy are translated at one boundary
each (``outbox.kafka`` and ``outbox.store``) and chained with ``from``.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "MessageTooLargeError",
    "OutboxError",
    "PublishError",
    "StoreError",
]


class OutboxError(Exception):
    """Root of the errors raised by ``outbox``."""

    retriable: bool = False
    """Whether the same operation may succeed if tried again later."""


class ConfigurationError(OutboxError, ValueError):
    """A setting, table name or argument is invalid."""


class StoreError(OutboxError):
    """The outbox or inbox tables could not be read or written."""

    def __init__(self, message: str, *, retriable: bool = False) -> None:
        super().__init__(message)
        self.retriable = retriable


class PublishError(OutboxError):
    """A record could not be published to the broker."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


class MessageTooLargeError(PublishError):
    """The record is larger than the producer or the broker accepts."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retriable=False)
