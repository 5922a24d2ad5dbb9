"""An independent reader of every topic of a run: what was really on the wire.

It belongs to no consumer group and commits nothing: it assigns itself every
partition of the saga topic and of its dead-letter topic, reads from the
beginning for the whole run (stalling, like everyone, while the broker is
paused) and keeps one :class:`WireRecord` per record, duplicates included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition

from outbox import KafkaSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WireRecord:
    """One record as read from the broker."""

    topic: str
    partition: int
    offset: int
    key: str
    ce_id: str
    ce_source: str
    ce_type: str
    timestamp_ms: int


def _header(headers: object, name: str) -> str:
    for key, value in headers or ():  # type: ignore[attr-defined]
        if key == name and value is not None:
            return bytes(value).decode(errors="replace")
    return ""


class WireReader:
    """Reads ``topics`` from the beginning in the background until stopped."""

    def __init__(self, settings: KafkaSettings, topics: list[str]) -> None:
        self.settings = settings
        self.topics = topics
        self.records: list[WireRecord] = []
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._partitions: list[TopicPartition] = []

    async def start(self) -> None:
        kwargs = self.settings.consumer_kwargs(None)
        kwargs.update(fetch_max_wait_ms=50, max_poll_records=2000)
        consumer = AIOKafkaConsumer(**kwargs)
        await consumer.start()
        for _ in range(100):
            found = {t: consumer.partitions_for_topic(t) for t in self.topics}
            if all(found.values()):
                break
            await consumer._client.force_metadata_update()
            await asyncio.sleep(0.1)
        self._partitions = [
            TopicPartition(t, p) for t in self.topics for p in sorted(found[t] or ())
        ]
        consumer.assign(self._partitions)
        await consumer.seek_to_beginning(*self._partitions)
        self._consumer = consumer
        self._task = asyncio.create_task(self._loop(), name="wire-reader")

    async def _loop(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                batch = await self._consumer.getmany(timeout_ms=200)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker may be paused; keep reading
                log.warning("wire reader: %s", exc)
                await asyncio.sleep(0.5)
                continue
            for records in batch.values():
                for r in records:
                    self.records.append(
                        WireRecord(
                            topic=r.topic,
                            partition=r.partition,
                            offset=r.offset,
                            key=(r.key or b"").decode(errors="replace"),
                            ce_id=_header(r.headers, "ce_id"),
                            ce_source=_header(r.headers, "ce_source"),
                            ce_type=_header(r.headers, "ce_type"),
                            timestamp_ms=r.timestamp,
                        )
                    )

    async def settle(self, quiet: float = 2.0, timeout: float = 60.0) -> None:
        """Wait until nothing new has arrived for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        count, since = len(self.records), time.monotonic()
        while time.monotonic() - since < quiet and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            if len(self.records) != count:
                count, since = len(self.records), time.monotonic()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()
