"""Read saga messages straight from the topics (``saga trace --from-kafka``).

For when no observer ran: every partition of the matching topics is read
from the beginning up to its high watermark as of the scan, with a consumer
outside any group (nothing is committed). Records are filtered on their
headers and key before anything is decoded.

The high watermark is taken from fetch responses (``highwater()``), not from
``end_offsets()``, which some Kafka-protocol brokers answer wrongly after
batched produce.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from outbox import KafkaSettings
from saga.codec import AvroCodec
from saga.envelope import H
from saga.errors import BrokerError, DecodeError
from saga.observe.message import ObservedMessage, observe_record
from saga.observe.topics import DEFAULT_PATTERNS, matching_topics

__all__ = ["scan_kafka"]


def _concerns(ref: bytes, key: bytes | None, headers: Sequence[tuple[str, bytes | None]]) -> bool:
    if key == ref:
        return True
    return any(name in (H.SUBJECT, H.CORRELATION_ID) and value == ref for name, value in headers)


async def scan_kafka(
    kafka: KafkaSettings,
    codec: AvroCodec,
    ref: str,
    *,
    patterns: Sequence[str] = DEFAULT_PATTERNS,
    progress: TextIO | None = None,
    idle_timeout: float = 3.0,
) -> list[ObservedMessage]:
    """Every message of the saga whose id or correlation id is ``ref``, from the topics.

    Args:
        progress: Where to draw a progress bar (pass a terminal), or ``None``.
        idle_timeout: Stop after this many seconds without records even if a
            partition's high watermark is not known yet.
    """
    topics = await matching_topics(kafka, patterns)
    wanted = ref.encode()
    found: list[ObservedMessage] = []
    options = kafka.consumer_kwargs(None)
    options.pop("group_id", None)
    consumer = AIOKafkaConsumer(group_id=None, **options)
    try:
        await consumer.start()
        partitions = [
            TopicPartition(topic, p)
            for topic in topics
            for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        if not partitions:
            return []
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        read = 0
        last_record = time.monotonic()
        while True:
            batches = await consumer.getmany(timeout_ms=200)
            for tp, records in batches.items():
                for record in records:
                    read += 1
                    last_record = time.monotonic()
                    if not _concerns(wanted, record.key, record.headers):
                        continue
                    try:
                        observed = observe_record(
                            codec,
                            value=record.value,
                            headers=record.headers,
                            topic=tp.topic,
                            partition=tp.partition,
                            offset=record.offset,
                        )
                    except DecodeError:
                        continue
                    if observed is not None:
                        found.append(observed)
            marks = [consumer.highwater(tp) for tp in partitions]
            total = sum(m for m in marks if m is not None)
            if progress is not None:
                _bar(progress, read, total)
            caught_up = True
            for tp, mark in zip(partitions, marks, strict=True):
                if mark is None or await consumer.position(tp) < mark:
                    caught_up = False
                    break
            if caught_up or time.monotonic() - last_record > idle_timeout:
                break
            await asyncio.sleep(0)
    except KafkaError as exc:
        raise BrokerError(f"could not scan the saga topics: {exc}") from exc
    finally:
        if progress is not None:
            progress.write("\n")
            progress.flush()
        await consumer.stop()
    return found


def _bar(out: TextIO, done: int, total: int) -> None:
    width = 30
    filled = width if total <= 0 else min(width, width * done // total)
    out.write(f"\rscanning [{'#' * filled}{'.' * (width - filled)}] {done}/{total} records")
    out.flush()


def terminal_or_none(stream: TextIO = sys.stderr) -> TextIO | None:
    """``stream`` if it is a terminal (a progress bar belongs there only)."""
    return stream if stream.isatty() else None
