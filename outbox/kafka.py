"""Kafka side of the outbox: the aiokafka publisher, topic creation, error mapping.

This module is the one place where aiokafka errors become
:class:`~outbox.errors.PublishError`: a record too large for the producer or
broker, an invalid or unknown topic or a refused authorisation are permanent
(the relay parks the row); a broker that cannot be reached is an outage;
everything else is treated as transient (the relay backs off and tries
again), because parking a row that could have been published is worse than
waiting.

What aiokafka does not say plainly, and how it is handled here:

* A record for a topic the broker does not know (automatic topic creation
  off, or a name the broker refuses) is not refused: ``send()`` asks for
  metadata again and again for ``request_timeout_ms`` and then raises the
  *retriable* ``UnknownTopicOrPartitionError`` -- exactly what it raises
  when the broker is down. So before the first record of a topic the
  producer has no metadata for, the publisher asks one broker about that
  topic itself: an answer "unknown", "invalid" or "not authorised" parks the
  row at once; no answer is an outage, and nothing is parked.
* The producer's background sender task can end (aiokafka logs "Unexpected
  error in sender routine"); every later ``send()`` then fails, forever. The
  publisher checks the task before each batch and replaces a producer whose
  sender has ended.
* A broker without idempotent producers (the embedded test broker, old or
  restricted clusters) fails ``InitProducerId`` with ``UnknownError [-1]``;
  ``start()`` says how to fix that instead.
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
    UnknownError,
    UnsupportedCodecError,
    UnsupportedVersionError,
    for_code,
)
from aiokafka.protocol.metadata import MetadataRequest

from outbox.errors import MessageTooLargeError, PublishError
from outbox.failures import ErrorKind, classify
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
    kind = ErrorKind.OUTAGE if classify(exc) is ErrorKind.OUTAGE else ErrorKind.TRANSIENT
    return PublishError(f"{type(exc).__name__}: {exc}", retriable=True, kind=kind)


# Metadata error codes that mean "this topic can never be produced to as it is".
_TOPIC_REFUSED = {
    3: "does not exist (and the broker does not create topics automatically)",
    17: "is not a valid topic name",
    29: "may not be written by this client (topic authorization failed)",
}


class KafkaPublisher(Publisher):
    """Publishes outbox rows with an ``AIOKafkaProducer`` (acks=all by default).

    The producer is created on :meth:`start` and re-created after a failed
    start, so a relay started while the broker is down recovers by itself;
    a producer whose background sender has died is replaced too.
    """

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        # Without the idempotent producer a failed record does not fail the
        # later ones of its partition: send a key's records one at a time.
        self.pipelines_keys = settings.enable_idempotence
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        async with self._lock:
            if self._producer is not None:
                if _sender_alive(self._producer):
                    return
                dead, self._producer = self._producer, None
                log.error("the Kafka producer's sender task ended; replacing the producer")
                try:
                    await dead.stop()
                except Exception as exc:  # it is being thrown away: say so, go on
                    log.warning("stopping the dead Kafka producer failed: %r", exc)
            producer = AIOKafkaProducer(**self.settings.producer_kwargs())
            try:
                await producer.start()
            except BaseException as exc:
                await producer.stop()
                if isinstance(exc, Exception):
                    raise self._start_error(exc) from exc
                raise
            self._producer = producer

    def _start_error(self, exc: Exception) -> PublishError:
        servers = self.settings.bootstrap_servers
        if self.settings.enable_idempotence and isinstance(
            exc, UnknownError | UnsupportedVersionError
        ):
            return PublishError(
                f"the Kafka broker at {servers} refused an idempotent producer "
                f"(InitProducerId failed: {type(exc).__name__}): set "
                "KAFKA_ENABLE_IDEMPOTENCE=false, or use a broker that supports "
                "idempotent producers",
                retriable=False,
            )
        error = translate_kafka_error(exc)
        if error.kind is ErrorKind.OUTAGE:
            return PublishError(
                f"could not reach the Kafka brokers at {servers}: {error}",
                retriable=True,
                kind=ErrorKind.OUTAGE,
            )
        return error

    async def stop(self) -> None:
        async with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    async def send(self, message: StoredMessage) -> Awaitable[None]:
        await self.start()
        producer = self._producer
        assert producer is not None
        if producer.client.cluster.partitions_for_topic(message.topic) is None:
            await self._check_topic(producer, message.topic)
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

    async def _check_topic(self, producer: AIOKafkaProducer, topic: str) -> None:
        """Refuse a topic the broker says it does not have; never guess when it is silent.

        Raises:
            PublishError: Permanent when the broker answered that the topic is
                unknown, invalid or not authorised; an outage when no broker
                answered.
        """
        client = producer.client
        node_id = client.get_random_node()
        try:
            if node_id is None:
                raise PublishError("no broker known", retriable=True, kind=ErrorKind.OUTAGE)
            response = await client.send(node_id, MetadataRequest([topic]))
        except (KafkaError, TimeoutError, OSError) as exc:
            raise translate_kafka_error(exc) from exc
        for entry in response.topics:
            code, name = entry[0], entry[1]
            if name == topic and code in _TOPIC_REFUSED:
                raise PublishError(
                    f"topic {topic!r} {_TOPIC_REFUSED[code]} ({for_code(code).__name__})",
                    retriable=False,
                )

    def translate(self, exc: BaseException) -> PublishError:
        return translate_kafka_error(exc)


def _sender_alive(producer: AIOKafkaProducer) -> bool:
    """Whether the producer's background sender task still runs (aiokafka internals)."""
    sender = getattr(producer, "_sender", None)
    task = getattr(sender, "sender_task", None)
    return task is None or not task.done()


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
