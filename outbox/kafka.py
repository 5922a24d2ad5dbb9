"""Kafka side of the outbox: the aiokafka publisher, topic creation, error mapping.

This module is the one place where aiokafka errors become
:class:`~outbox.errors.PublishError`: a record too large for the producer or
broker, an invalid topic or a refused authorisation are permanent (the relay
parks the row); everything else, timeouts included, is treated as transient
(the relay backs off and tries again), because losing a row is worse than
waiting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping
from typing import cast

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
    UnsupportedCodecError,
    for_code,
)

from outbox.errors import MessageTooLargeError, PublishError
from outbox.message import StoredMessage
from outbox.publisher import Publisher
from outbox.settings import KafkaSettings

__all__ = ["KafkaPublisher", "ensure_topics", "translate_kafka_error"]

log = logging.getLogger(__name__)

_TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError)
_PERMANENT = (InvalidTopicError, TopicAuthorizationFailedError, UnsupportedCodecError)
_TOPIC_ALREADY_EXISTS = 36


def translate_kafka_error(exc: BaseException) -> PublishError:
    """Map an aiokafka (or other) exception raised while producing to a PublishError."""
    if isinstance(exc, _TOO_LARGE):
        return MessageTooLargeError(f"record too large for the broker: {exc}")
    if isinstance(exc, _PERMANENT):
        return PublishError(f"{type(exc).__name__}: {exc}", retriable=False)
    return PublishError(f"{type(exc).__name__}: {exc}", retriable=True)


class KafkaPublisher(Publisher):
    """Publishes outbox rows with an ``AIOKafkaProducer`` (acks=all by default).

    The producer is created on :meth:`start` and re-created after a failed
    start, so a relay started while the broker is down recovers by itself.
    """

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        async with self._lock:
            if self._producer is not None:
                return
            producer = AIOKafkaProducer(**self.settings.producer_kwargs())
            try:
                await producer.start()
            except BaseException as exc:
                await producer.stop()
                if isinstance(exc, Exception):
                    raise translate_kafka_error(exc) from exc
                raise
            self._producer = producer

    async def stop(self) -> None:
        async with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    async def send(self, message: StoredMessage) -> Awaitable[None]:
        await self.start()
        producer = self._producer
        assert producer is not None
        try:
            future = await producer.send(
                message.topic,
                value=message.value,
                key=message.key,
                headers=list(message.headers),
            )
        except (KafkaError, TimeoutError) as exc:
            raise translate_kafka_error(exc) from exc
        # The producer's own future: wrapping it in a coroutine per record
        # would cost a Task each when the batch is gathered.
        return cast("asyncio.Future[None]", future)

    def translate(self, exc: BaseException) -> PublishError:
        return translate_kafka_error(exc)


async def ensure_topics(
    settings: KafkaSettings,
    topics: Mapping[str, int],
    *,
    replication_factor: int = 1,
) -> None:
    """Create topics that do not exist yet, with the given partition counts.

    Create topics explicitly: brokers that auto-create topics pick their own
    partition count, and per-key order needs a count chosen on purpose.
    Existing topics are left as they are.
    """
    admin = AIOKafkaAdminClient(**settings.admin_kwargs())
    try:
        try:
            await admin.start()
        except KafkaError as exc:
            raise PublishError(
                f"no Kafka broker answered at {settings.bootstrap_servers} ({type(exc).__name__})",
                retriable=True,
            ) from exc
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(name, num_partitions=partitions, replication_factor=replication_factor)
            for name, partitions in topics.items()
            if name not in existing
        ]
        if not wanted:
            return
        response = await admin.create_topics(wanted)
        for topic_error in response.topic_errors:
            name, code = topic_error[0], topic_error[1]
            if code not in (0, _TOPIC_ALREADY_EXISTS):
                error = for_code(code)
                raise PublishError(
                    f"could not create topic {name!r}: {error.__name__}",
                    retriable=bool(getattr(error, "retriable", False)),
                )
    except KafkaError as exc:
        raise translate_kafka_error(exc) from exc
    finally:
        await admin.close()
