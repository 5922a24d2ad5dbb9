"""A fenced relay, unique relay names, and key order after a failed acknowledgement.

Against a real PostgreSQL and a real broker, with real relay processes frozen
by SIGSTOP past their lease: a relay that lost its lease sends and marks
nothing more; relays of forked workers never share a name; a row acknowledged
after an earlier row of its key failed is neither marked nor counted, and goes
out again after it.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from support import core_codec, read_topic

from outbox import (
    KafkaSettings,
    MemoryPublisher,
    OutboxMessage,
    OutboxTables,
    PublishError,
    Relay,
    RelaySettings,
    SqlOutboxStore,
    StoredMessage,
    create_engine,
)

HELPER = Path(__file__).parent / "fencing_relay.py"


class Outbox:
    """An outbox with 8 shards on a fresh database."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(url)
        self.tables = OutboxTables()
        self.store = SqlOutboxStore(self.engine, self.tables, shards=8)

    async def add(self, topic: str, items: list[tuple[str, str]]) -> None:
        """Add (key, message id) rows, value = message id, in one transaction."""
        async with self.engine.begin() as conn:
            await self.store.add(
                conn,
                [
                    OutboxMessage(topic=topic, key=k.encode(), value=m.encode(), message_id=m)
                    for k, m in items
                ],
            )

    async def marks(self) -> list[tuple[str, int | None]]:
        """(message id, published_at_ms) of every row, in id order."""
        t = self.tables.outbox
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(t.c.message_id, t.c.published_at_ms).order_by(t.c.id)
            )
            return [(r.message_id, r.published_at_ms) for r in rows]


@pytest.fixture
async def pg_outbox(postgres_url: str) -> AsyncIterator[Outbox]:
    box = Outbox(postgres_url)
    await box.tables.create_all(box.engine)
    yield box
    await box.engine.dispose()


# -- item 4: fencing ---------------------------------------------------------------


def relay_process(
    box: Outbox, settings: KafkaSettings, name: str, tmp: Path, *, delay: float = 0.0
) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "FENCING_SEND_DELAY": str(delay),
        "FENCING_SENT_LOG": str(tmp / f"{name}.sent"),
    }
    return subprocess.Popen(
        [sys.executable, "-P", str(HELPER), box.url, settings.bootstrap_servers, name],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop_relay(process: subprocess.Popen[str]) -> tuple[dict[str, Any], str]:
    process.send_signal(signal.SIGCONT)
    process.send_signal(signal.SIGTERM)
    try:
        out, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    assert process.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


def sent(tmp: Path, name: str) -> list[str]:
    path = tmp / f"{name}.sent"
    return path.read_text().split() if path.exists() else []


@pytest.mark.slow
async def test_zombie_relay_woken_after_takeover_sends_and_marks_nothing(
    pg_outbox: Outbox, kafka_settings: KafkaSettings, new_topic: Any, tmp_path: Path
) -> None:
    box = pg_outbox
    topic = await new_topic(partitions=3)
    ids = [f"m{i:03d}" for i in range(120)]
    await box.add(topic, [("order-1", m) for m in ids])  # one key: one shard

    # Relay A sends slowly (0.1 s per record, batches of 50, a 2 s lease)...
    zombie = relay_process(box, kafka_settings, "zombie", tmp_path, delay=0.1)
    holder: subprocess.Popen[str] | None = None
    try:
        deadline = time.monotonic() + 30
        while len(sent(tmp_path, "zombie")) < 10:
            assert time.monotonic() < deadline, "relay A sent nothing"
            await asyncio.sleep(0.02)
        zombie.send_signal(signal.SIGSTOP)  # ... and freezes inside its first batch
        frozen_sent = sent(tmp_path, "zombie")
        assert len(frozen_sent) < 50, "froze too late: the first batch was sent"
        await asyncio.sleep(3.0)  # past its 2 s lease

        # Relay B takes the shard and publishes everything.
        holder = relay_process(box, kafka_settings, "holder", tmp_path)
        deadline = time.monotonic() + 60
        while any(at is None for _, at in await box.marks()):
            assert time.monotonic() < deadline, "relay B did not publish the rows"
            await asyncio.sleep(0.1)
        zombie.send_signal(signal.SIGCONT)  # A wakes up in the middle of its batch
        await asyncio.sleep(3.0)
        holder_stats, _ = stop_relay(holder)
        zombie_stats, zombie_log = stop_relay(zombie)
    finally:
        for process in (zombie, holder):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
                process.communicate()

    # A sent nothing after it woke, and said why.
    assert sent(tmp_path, "zombie") == frozen_sent
    assert "lost the lease" in zombie_log
    # Every row marked, once, by the lease holder.
    assert all(at is not None for _, at in await box.marks())
    assert holder_stats["published"] == len(ids)
    assert zombie_stats["published"] == 0

    records = await read_topic(kafka_settings, topic, len(ids), timeout=60)
    received = [r.value.decode() for r in records]
    first: list[str] = []
    for value in received:
        if value not in first:
            first.append(value)
    assert first == ids  # the key's first deliveries are in commit order
    duplicates = {v for v, n in Counter(received).items() if n > 1}
    # The duplicates are exactly what A sent of the batch it had fetched
    # (its first 50 rows) before it lost the lease.
    assert duplicates == set(frozen_sent)
    assert duplicates <= set(ids[:50])
    print(f"zombie relay: {len(frozen_sent)} sent before the freeze, {len(duplicates)} duplicates")


@pytest.mark.parametrize("delete", [False, True], ids=["keeping rows", "deleting rows"])
async def test_relay_that_lost_its_shard_to_another_marks_nothing(
    pg_outbox: Outbox, delete: bool
) -> None:
    """Nor deletes anything, when it keeps no published rows (retention zero)."""
    box = pg_outbox
    await box.add("orders", [("order-1", f"m{i}") for i in range(5)])
    other = SqlOutboxStore(box.engine, box.tables, shards=8)
    ttl = timedelta(milliseconds=300)

    shards = await box.store.claim_shards("relay-a", ttl)
    fence_a = box.store.fence("relay-a")
    batch = await box.store.fetch_due(shards, 100)
    assert len(batch) == 5
    await asyncio.sleep(0.5)  # A is paused past its lease; B takes every shard
    assert await other.claim_shards("relay-b", timedelta(seconds=5)) == shards

    assert await box.store.mark_published(batch, fence=fence_a, delete=delete) == 0
    marks = await box.marks()
    assert len(marks) == 5
    assert all(at is None for _, at in marks)
    assert await other.mark_published(batch, fence=other.fence("relay-b"), delete=delete) == 5
    assert len(await box.marks()) == (0 if delete else 5)


async def test_relay_renewing_its_own_expired_lease_keeps_marking(pg_outbox: Outbox) -> None:
    box = pg_outbox
    await box.add("orders", [("order-1", f"m{i}") for i in range(3)])
    ttl = timedelta(milliseconds=200)
    shards = await box.store.claim_shards("relay-a", ttl)
    fence = box.store.fence("relay-a")
    batch = await box.store.fetch_due(shards, 100)
    await asyncio.sleep(0.3)  # expired, but nobody else took the shards
    assert await box.store.claim_shards("relay-a", ttl) == shards
    assert box.store.fence("relay-a") == fence  # same epochs: nobody could have published
    assert await box.store.mark_published(batch, fence=fence) == 3


# -- item 5: relay names -------------------------------------------------------------


def _names_in_child(service: Any, queue: Any, url: str) -> None:
    from saga import Service

    fresh = Service(
        "billing",
        engine=create_engine(url),
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:9"),
        codec=core_codec(),
    )
    queue.put((service.relay.name, fresh.relay.name))


def test_forked_workers_name_their_relays_apart(postgres_url: str) -> None:
    from saga import Service

    # A pre-loading server makes the service, then forks its workers; other
    # servers fork first and each worker makes its own.
    preloaded = Service(
        "billing",
        engine=create_engine(postgres_url),
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:9"),
        codec=core_codec(),
    )
    fork = multiprocessing.get_context("fork")
    queue = fork.Queue()
    workers = [
        fork.Process(target=_names_in_child, args=(preloaded, queue, postgres_url))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    names = [queue.get(timeout=30) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    everyone = [preloaded.relay.name] + [n for pair in names for n in pair]
    assert len(set(everyone)) == len(everyone), everyone
    assert all(n.startswith("billing:") for n in everyone)
    # Each worker's relays carry its own pid (name: service, host, pid, random part).
    pids = {str(w.pid) for w in workers}
    assert {n.split(":")[-2] for pair in names for n in pair} == pids


# -- item 6: key order after a failed acknowledgement --------------------------------


class MarkRecordingStore(SqlOutboxStore):
    """The SQL store, remembering which rows each mark statement marked."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rounds: list[list[str]] = []

    async def mark_published(self, messages: Sequence[StoredMessage], *, fence: Any = None) -> int:
        if fence is None:
            marked = await super().mark_published(messages)
        else:
            marked = await super().mark_published(messages, fence=fence)
        assert marked == len(messages)  # one relay: it never loses its shards here
        if messages:
            self.rounds.append([m.message_id for m in messages])
        return marked


async def test_failed_ack_keeps_later_rows_of_the_key_unmarked_and_resends_them(
    pg_outbox: Outbox,
) -> None:
    box = pg_outbox
    await box.add("orders", [("k", f"k{i}") for i in range(5)] + [("x", f"x{i}") for i in range(3)])
    failures = {"k1"}

    def fail_ack(message: StoredMessage) -> PublishError | None:
        if message.message_id in failures:
            failures.discard(message.message_id)  # fails once
            return PublishError("NotEnoughReplicasError: ack lost", retriable=True)
        return None

    publisher = MemoryPublisher(fail_ack=fail_ack)
    settings = RelaySettings(
        batch_size=100,
        poll_interval=timedelta(milliseconds=50),
        lease_ttl=timedelta(seconds=2),
    )
    store = MarkRecordingStore(box.engine, box.tables, shards=8)
    async with Relay(store, publisher, settings) as relay:
        deadline = time.monotonic() + 30
        while any(at is None for _, at in await box.marks()):
            assert time.monotonic() < deadline, "rows left unpublished"
            await asyncio.sleep(0.05)
    assert relay.stats.published == 8  # each row counted once
    # No row of a key is marked before an earlier row of that key: k2..k4
    # wait for k1, which failed in the first round.
    round_of = {m: n for n, marked in enumerate(store.rounds) for m in marked}
    for key in ("k", "x"):
        rounds = [round_of[m] for m, _ in await box.marks() if m.startswith(key)]
        assert rounds == sorted(rounds), (key, store.rounds)
    wire = [r.message_id for r in publisher.topic("orders") if r.key == b"k"]
    # k1 never reached the log; k2..k4 went out again after it, in order.
    assert wire[wire.index("k1") :] == ["k1", "k2", "k3", "k4"], wire
    assert wire[0] == "k0"
    assert [r.message_id for r in publisher.topic("orders") if r.key == b"x"] == ["x0", "x1", "x2"]


async def test_failed_ack_without_pipelining_keeps_first_deliveries_in_commit_order(
    pg_outbox: Outbox,
) -> None:
    # A producer without idempotence: a key's records go one at a time, so a
    # record whose acknowledgement failed (it never reached the log) is not
    # overtaken by the next record of its key.
    box = pg_outbox
    await box.add("orders", [("k", f"k{i}") for i in range(5)] + [("x", f"x{i}") for i in range(3)])
    failures = {"k1"}

    def fail_ack(message: StoredMessage) -> PublishError | None:
        if message.message_id in failures:
            failures.discard(message.message_id)
            return PublishError("RequestTimedOutError: no acknowledgement", retriable=True)
        return None

    publisher = MemoryPublisher(fail_ack=fail_ack, pipelines_keys=False)
    settings = RelaySettings(poll_interval=timedelta(milliseconds=50))
    async with Relay(box.store, publisher, settings) as relay:
        deadline = time.monotonic() + 30
        while any(at is None for _, at in await box.marks()):
            assert time.monotonic() < deadline, "rows left unpublished"
            await asyncio.sleep(0.05)
    assert relay.stats.published == 8
    wire = [r.message_id for r in publisher.topic("orders") if r.key == b"k"]
    assert wire == ["k0", "k1", "k2", "k3", "k4"]  # in order, and no duplicate
    assert [r.message_id for r in publisher.topic("orders") if r.key == b"x"] == ["x0", "x1", "x2"]
