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

How a batch is published, and the order it keeps
-------------------------------------------------

:meth:`KafkaPublisher.publish` does not call ``producer.send()`` per record.
It sorts the batch into *lanes*, one per topic partition (the producer's own
partitioner picks it, as ``send()`` would), fills aiokafka record batches
(``create_batch()``, closed, so they leave at once without ``linger_ms``)
and hands each lane's batches to ``send_batch()`` one after the other: a
lane's next record batch goes out only once the previous one was
acknowledged. All lanes run at the same time, so a round costs about one
produce round trip per ``max_batch_size`` bytes of its busiest partition
(``KafkaSettings.max_batch_size``, 64 KiB).

What this relies on (aiokafka 0.11 to 0.14, Apache Kafka):

* A record batch is appended whole or not at all, so its records share one
  outcome; records of one key are in one partition, hence one lane, in
  commit order.
* Without the idempotent producer, aiokafka retries a failed request but
  gives up on a batch once it expired (``request_timeout_ms``) or got a
  final error, and then sends the *next* batch of the partition: with
  several batches of a partition queued, a key's later record could reach
  the log while an earlier one never did. A lane never queues a second
  batch before the first is acknowledged, so this cannot happen: once a
  lane's batch fails, the rest of the lane is not sent
  (:class:`~outbox.publisher.HeldBackError`: the rows stay pending and no
  attempt is counted) and a key's first deliveries stay in commit order.
  aiokafka sends at most one request per broker at a time (and re-queues a
  retried batch at the head of its partition), so retries inside the
  producer do not reorder either.
* With the idempotent producer the same holds; the lanes cost nothing
  extra there.
* A broker refuses a record batch as a whole for what is in it: larger
  than its ``message.max.bytes`` (or the topic's ``max.message.bytes``),
  which can be below ``max_batch_size``, or one record it will never take
  (no key on a compacted topic). Nothing of it was appended, and the broker
  is answering: without the idempotent producer a lane then sends that
  batch's records again, one per record batch, so that only the record at
  fault fails (parked when it is too large, else tried again next round
  while its key waits), and the lane goes on with its other keys. With it,
  aiokafka does not give back the sequence numbers of a refused batch: the
  next batch of that partition would be refused as out of order
  (OUT_OF_ORDER_SEQUENCE_NUMBER), so the lane stops there as after any
  failure. After any batch the broker refused (a non-retriable answer,
  out-of-order sequence numbers included), the publisher replaces its
  producer before the next batch: a new producer id starts its sequence
  numbers afresh, and the held-back rows go out in the next round.
* ``producer._serialize`` (the size check against ``max_request_size``)
  and ``producer._partition`` are aiokafka internals, used so that a record
  is refused and placed exactly as ``send()`` would; the version range in
  pyproject.toml pins them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    BrokerResponseError,
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
from outbox.publisher import HeldBackError, NotSentError, Publisher, current_send_gate
from outbox.settings import KafkaSettings

__all__ = ["KafkaPublisher", "ensure_topics", "idempotence_refused", "translate_kafka_error"]

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


def idempotence_refused(settings: KafkaSettings, exc: BaseException) -> str | None:
    """What to tell when a producer could not start because the broker refused an
    idempotent producer (``InitProducerId`` failed); ``None`` for any other error.

    Only for an error of ``producer.start()``: later, the same error types mean
    other things.
    """
    if settings.enable_idempotence and isinstance(exc, UnknownError | UnsupportedVersionError):
        return (
            f"the Kafka broker at {settings.bootstrap_servers} refused an idempotent producer "
            f"(InitProducerId failed: {type(exc).__name__}): set "
            "KAFKA_ENABLE_IDEMPOTENCE=false, or use a broker that supports "
            "idempotent producers"
        )
    return None


class KafkaPublisher(Publisher):
    """Publishes outbox rows with an ``AIOKafkaProducer`` (acks=all by default).

    The producer is created on :meth:`start` and re-created after a failed
    start, so a relay started while the broker is down recovers by itself;
    a producer whose background sender has died is replaced too.

    :meth:`publish` sends a batch in per-partition lanes of record batches
    (see the module docstring); :meth:`send` still publishes one record.
    """

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        # Without the idempotent producer a failed record does not fail the
        # later ones of its partition: send a key's records one at a time.
        self.pipelines_keys = settings.enable_idempotence
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()
        self._renew = False
        """Replace the producer before the next batch (a record batch was refused)."""
        self.renewals = 0
        """Producers replaced after the broker refused a record batch."""

    async def start(self) -> None:
        async with self._lock:
            if self._producer is not None:
                renew, alive = self._renew, _sender_alive(self._producer)
                if alive and not renew:
                    return
                dead, self._producer = self._producer, None
                self._renew = False
                if not alive:
                    log.error("the Kafka producer's sender task ended; replacing the producer")
                else:
                    # The idempotent producer keeps the sequence numbers of a
                    # refused batch: every later batch of its partition would be
                    # refused as out of order. A new producer starts afresh.
                    self.renewals += 1
                    log.warning("the broker refused a record batch; replacing the producer")
                try:
                    await dead.stop()
                except Exception as exc:  # it is being thrown away: say so, go on
                    log.warning("stopping the replaced Kafka producer failed: %r", exc)
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
        refused = idempotence_refused(self.settings, exc)
        if refused is not None:
            return PublishError(refused, retriable=False)
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

    async def publish(self, batch: Sequence[StoredMessage]) -> list[PublishError | None]:
        """Publish ``batch`` in per-partition lanes; one outcome per record, in order.

        A record refused before sending (too large, an unknown topic) fails
        alone, and later records of its topic and key are held back; a
        record batch whose acknowledgement fails fails all its records, and
        the rest of its lane is held back. Once the send gate refuses a
        record, nothing more is sent (:class:`NotSentError`).
        """
        await self.start()
        producer = self._producer
        assert producer is not None
        run = _Run(batch, current_send_gate())
        # A lane holds positions in the batch, not an object per record: a
        # batch lives long enough for the garbage collector to move what it
        # holds to its oldest generation, and every object moved there brings
        # the next full collection closer (see _Run).
        lanes: dict[tuple[str, int], list[int]] = {}
        topic_errors: dict[str, PublishError | None] = {}
        placed: dict[tuple[str, bytes], int] = {}
        # Topics whose partitions were known when last looked at, with no await
        # since: nothing else runs in between, so no metadata refresh can have
        # made aiokafka forget them, and their records need not ask again.
        known: set[str] = set()
        refused = run.refused
        for index, message in enumerate(batch):
            topic = message.topic
            key = (topic, message.key) if message.key is not None else None
            if key is not None and key in refused:
                run.outcomes[index] = HeldBackError()
                continue
            if topic in known:
                error = None
            else:
                if topic not in topic_errors:
                    topic_errors[topic] = await self._metadata_error(producer, topic)
                    known.clear()
                error = topic_errors[topic]
                if error is None and producer.client.cluster.partitions_for_topic(topic) is None:
                    # Known when its first record was placed, but a metadata refresh
                    # since (an answer with an error for this topic, during a leader
                    # election say) made aiokafka forget its partitions: ask again.
                    error = await self._metadata_error(producer, topic)
                    known.clear()
                if error is None:
                    known.add(topic)
            if error is None:
                try:
                    serialized = producer._serialize(
                        message.key, message.value, list(message.headers)
                    )
                    key_partition = placed.get(key) if key is not None else None
                    if key_partition is None:
                        partition = producer._partition(
                            topic, None, message.key, message.value, *serialized
                        )
                        if key is not None:
                            placed[key] = partition
                    else:
                        partition = key_partition
                except KafkaError as exc:
                    error = translate_kafka_error(exc)
            if error is not None:
                run.outcomes[index] = error
                if key is not None:
                    refused.add(key)
                continue
            run.keys[index] = key
            run.serialized[index] = serialized
            lane = lanes.get((topic, partition))
            if lane is None:
                lane = lanes[topic, partition] = []
            lane.append(index)
        await asyncio.gather(
            *(
                self._send_lane(producer, run, TopicPartition(topic, partition), lane)
                for (topic, partition), lane in lanes.items()
            )
        )
        return run.outcomes

    async def _metadata_error(self, producer: AIOKafkaProducer, topic: str) -> PublishError | None:
        """Why records for ``topic`` cannot be sent now; ``None`` once its partitions are known."""
        try:
            if producer.client.cluster.partitions_for_topic(topic) is None:
                await self._check_topic(producer, topic)
            await producer.client._wait_on_metadata(topic)
        except PublishError as exc:
            return exc
        except (KafkaError, TimeoutError) as exc:
            return translate_kafka_error(exc)
        return None

    async def _send_lane(
        self, producer: AIOKafkaProducer, run: _Run, tp: TopicPartition, lane: list[int]
    ) -> None:
        """Send one partition's records, one record batch at a time, each acknowledged first.

        ``lane`` holds the records' positions in the batch.
        """
        batch, keys, serialized, outcomes = run.batch, run.keys, run.serialized, run.outcomes
        position = 0
        # Up to this position, each record batch holds one record (see below).
        one_by_one = 0
        while position < len(lane):
            builder = producer.create_batch()
            chunk: list[int] = []
            start = position
            while position < len(lane):
                index = lane[position]
                key = keys[index]
                if key is not None and key in run.refused:
                    outcomes[index] = HeldBackError()
                    position += 1
                    continue
                if chunk and position < one_by_one:
                    break
                message = batch[index]
                if not run.may_send(message):
                    break
                key_bytes, value_bytes = serialized[index]
                if (
                    builder.append(
                        timestamp=None,
                        key=key_bytes,
                        value=value_bytes,
                        headers=list(message.headers),
                    )
                    is None
                ):
                    if not chunk:  # cannot happen: an empty batch takes any record
                        raise RuntimeError("an empty record batch refused a record")
                    break
                chunk.append(index)
                position += 1
            if chunk:
                builder.close()  # full control over its records; sent without lingering
                try:
                    ack = await producer.send_batch(builder, tp.topic, partition=tp.partition)
                    await ack
                except Exception as exc:
                    error = self.translate(exc)
                    # The broker answered and refused this record batch for what
                    # is in it (too large, a record it will not take): not an
                    # outage, and nothing of the batch was appended.
                    refused = isinstance(exc, BrokerResponseError) and not exc.retriable
                    if refused:
                        self._renew = True
                    refused_batch = refused and not self.settings.enable_idempotence
                    if refused_batch and len(chunk) > 1:
                        # The broker's message.max.bytes (or the topic's) may be
                        # below max_batch_size, or one record may be refused:
                        # send those records again one per batch, so that only
                        # the record at fault fails (and is parked when it can
                        # never be published), not its neighbours of other keys.
                        # Not with the idempotent producer: aiokafka has used
                        # up the refused batch's sequence numbers, and the
                        # broker would refuse the next batch as out of order.
                        one_by_one = position
                        position = start
                        continue
                    for failed in chunk:
                        outcomes[failed] = error
                        if (key := keys[failed]) is not None:
                            run.refused.add(key)
                    if refused_batch:
                        # One record refused: its key's later records are held
                        # back above; the other keys of the lane go on.
                        continue
                    # A later batch of the partition could land while this one did
                    # not (see the module docstring): hold the rest of the lane back.
                    for held in lane[position:]:
                        outcomes[held] = HeldBackError()
                    return
            if run.stopped:
                for index in lane[position:]:
                    outcomes[index] = NotSentError()
                return


@dataclass
class _Run:
    """What the lanes of one publish call share: outcomes, refused keys, the send gate.

    Per record, by its position in the batch: its topic and key, and its key
    and value as serialized when it was placed (tuples of bytes, which the
    garbage collector stops tracking; an object per record would be tracked
    for as long as the batch lives).
    """

    batch: Sequence[StoredMessage]
    gate: Callable[[StoredMessage], bool] | None
    outcomes: list[PublishError | None] = field(init=False)
    keys: list[tuple[str, bytes] | None] = field(init=False)
    serialized: list[tuple[bytes | None, bytes | None]] = field(init=False)
    refused: set[tuple[str, bytes]] = field(default_factory=set)
    stopped: bool = False

    def __post_init__(self) -> None:
        self.outcomes = [None] * len(self.batch)
        self.keys = [None] * len(self.batch)
        self.serialized = [(None, None)] * len(self.batch)

    def may_send(self, message: StoredMessage) -> bool:
        """Ask the gate; once it refuses, every lane stops sending."""
        if not self.stopped and self.gate is not None and not self.gate(message):
            self.stopped = True
        return not self.stopped


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
