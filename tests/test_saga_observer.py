"""The saga observer on PostgreSQL and SQLite, fed through the real broker."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from aiokafka import AIOKafkaProducer
from conftest import NewTopicFactory
from sqlalchemy import select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from support import consumer_record, create_saga_log_keyed_by_id, sagas_keyed_by_id

from saga import (
    AvroCodec,
    Envelope,
    KafkaSettings,
    SagaStatus,
    SchemaRegistry,
    Stamp,
    StepOutcome,
    StepRecord,
    create_engine,
)
from saga.envelope import EnvelopeCodec
from saga.errors import ConfigurationError
from saga.observe import (
    ObserverSettings,
    SagaObserver,
    render_trace,
    trace_from_kafka,
    trace_from_log,
    trace_from_service,
)
from saga.observe.log import SagaLog
from saga.observe.status import saga_metrics, saga_status
from saga.observe.topics import matching_topics

SAGA_ENDED = "choreosaga.saga.SagaEnded"
COMPENSATE = "choreosaga.saga.Compensate"
DEADLINE_REACHED = "choreosaga.saga.DeadlineReached"
CODEC = AvroCodec(SchemaRegistry.default())


def stamped(saga_id: str, event_type: str, data: dict[str, object], *, hop: int, when: datetime,
            service: str, causation: str | None = None, saga: str = "place_order",
            correlation: str | None = None) -> Envelope:  # fmt: skip
    steps = (StepRecord(name="reserve_stock", service=service, outcome=StepOutcome.DONE, at=when),)
    stamp = Stamp(
        saga_name=saga,
        saga_id=saga_id,
        status=SagaStatus.RUNNING,
        steps=steps if hop else (),
        correlation_id=correlation or f"corr-{saga_id}",
        started_at=when,
        hop=hop,
    )
    return Envelope(
        type=event_type,
        data=data,
        source=f"/choreosaga/{service}",
        key=saga_id.encode(),
        time=when,
        correlation_id=stamp.correlation_id,
        causation_id=causation,
        traceparent=f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01",
        stamp=stamp,
    )


async def observer_on(
    engine: AsyncEngine, kafka: KafkaSettings | None = None, prefix: str = "saga."
) -> SagaObserver:
    """An observer of the topics ``<prefix>*`` in its own group, its tables created
    (without ``kafka``: one handed its records directly, never connecting)."""
    observer = SagaObserver(
        engine=engine,
        kafka=kafka or KafkaSettings(),
        codec=CODEC,
        settings=ObserverSettings(patterns=(prefix + "*",), group_id=prefix + "observer"),
    )
    await observer.create_tables()
    return observer


Record = tuple[bytes | None, bytes, list[tuple[str, bytes]]]


async def publish(kafka: KafkaSettings, topic: str, records: list[Record]) -> None:
    producer = AIOKafkaProducer(**kafka.producer_kwargs())
    await producer.start()
    try:
        for key, value, headers in records:
            await producer.send_and_wait(topic, value, key=key, headers=headers)
    finally:
        await producer.stop()


async def publish_saga_records(
    kafka_settings: KafkaSettings, new_topic: NewTopicFactory
) -> tuple[str, list[Envelope], int]:
    """Publish three saga messages, a duplicate, a record without stamp and one with a
    broken stamp; return the topic prefix, the three messages and the record count."""
    prefix = f"saga{uuid.uuid4().hex[:8]}."
    topic = await new_topic(2, prefix=prefix)
    codec = EnvelopeCodec(CODEC)
    now = datetime.now(UTC)
    first = stamped("order-1", COMPENSATE, {"step": "reserve_stock", "reason": "r"}, hop=0,
                    when=now, service="order")  # fmt: skip
    second = stamped("order-1", SAGA_ENDED, {"status": "COMPLETED", "reason": None}, hop=1,
                     when=now, service="inventory", causation=first.id)  # fmt: skip
    old = stamped("order-old", SAGA_ENDED, {"status": "COMPLETED", "reason": None}, hop=0,
                  when=now - timedelta(days=30), service="order")  # fmt: skip
    records = [codec.encode(e) for e in (first, second, old)]
    records.append(records[1])  # a duplicate publish
    records.append((b"x", b"not a saga message", [("ce_type", b"x")]))  # no stamp
    key, value, headers = codec.encode(first)
    garbage = base64.b64encode(b"\xc3\x01garbage")
    broken = [(n, v if n != "ce_sagastamp" else garbage) for n, v in headers]
    records.append((key, value, broken))  # unreadable stamp
    await publish(kafka_settings, topic, records)
    return prefix, [first, second, old], len(records)


@pytest.fixture
async def observed(
    database_url: str, kafka_settings: KafkaSettings, new_topic: NewTopicFactory
) -> AsyncIterator[tuple[SagaObserver, str, list[Envelope]]]:
    prefix, messages, count = await publish_saga_records(kafka_settings, new_topic)
    topic = await _only_topic(kafka_settings, prefix)
    engine = create_engine(database_url)
    observer = SagaObserver(
        engine=engine,
        kafka=kafka_settings,
        codec=CODEC,
        settings=ObserverSettings(
            patterns=(prefix + "*",),
            group_id=prefix + "observer",
            payloads=True,
            retention=timedelta(days=7),
        ),
    )
    await observer.create_tables()
    async with observer:
        deadline = time.monotonic() + 30
        stats = observer.stats
        while stats.stored + stats.duplicates + stats.skipped < count:
            assert time.monotonic() < deadline, f"observer stuck at {stats}"
            await asyncio.sleep(0.05)
        yield observer, topic, messages
    await engine.dispose()


async def test_each_message_is_stored_once_with_its_stamp_as_json(
    observed: tuple[SagaObserver, str, list[Envelope]],
) -> None:
    observer, topic, (first, second, old) = observed
    assert (observer.stats.stored, observer.stats.duplicates, observer.stats.skipped) == (3, 1, 2)
    log = observer.log
    async with observer.engine.connect() as conn:
        rows = (await conn.execute(select(log.messages).order_by(log.messages.c.hop))).all()
        # What psql or sqlite3 would show: plain text.
        raw = (await conn.execute(text("SELECT stamp, payload FROM saga_log WHERE hop = 1"))).one()
    assert sorted(r.message_id for r in rows) == sorted([first.id, second.id, old.id])
    row = next(r for r in rows if r.message_id == second.id)
    assert (row.saga_name, row.saga_id, row.event_type, row.service) == (
        "place_order", "order-1", SAGA_ENDED, "inventory"
    )  # fmt: skip
    assert (row.step, row.outcome, row.status, row.hop) == ("reserve_stock", "DONE", "RUNNING", 1)
    assert row.causation_id == first.id
    assert row.correlation_id == "corr-order-1"
    assert second.traceparent is not None
    assert row.trace_id == second.traceparent.split("-")[1]
    assert row.topic == topic
    stamp = json.loads(raw.stamp)
    assert stamp["saga_id"] == "order-1"
    assert stamp["steps"][0]["name"] == "reserve_stock"
    assert stamp["hop"] == 1
    assert json.loads(raw.payload) == {"status": "COMPLETED", "reason": None}
    trace = await trace_from_log(observer.engine, "corr-order-1")  # by correlation id
    assert trace is not None
    assert [e.message_id for e in trace.entries] == [first.id, second.id]
    assert trace.missing_hops == ()


async def test_retention_forgets_sagas_idle_longer_than_it(
    observed: tuple[SagaObserver, str, list[Envelope]],
) -> None:
    observer, _, (first, _, _) = observed
    assert await trace_from_log(observer.engine, "order-old") is not None
    assert await observer.cleanup() == 1
    assert await trace_from_log(observer.engine, "order-old") is None
    kept = await trace_from_log(observer.engine, "order-1")
    assert kept is not None
    assert kept.entries[0].message_id == first.id
    assert [s.saga_id for s in await observer.log.summaries(observer.engine)] == ["order-1"]


async def test_a_saga_topic_created_after_the_observer_started_is_read_within_seconds(
    postgres_url: str,
    kafka_settings: KafkaSettings,
    new_topic: NewTopicFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``saga observe`` started before the services created their topics: it does
    not wait for its 30-second topic refresh to store their first messages, and
    says (at WARNING, which the command shows) when it starts reading them."""
    prefix = f"saga{uuid.uuid4().hex[:8]}."
    engine = create_engine(postgres_url)
    observer = await observer_on(engine, kafka_settings, prefix)
    try:
        with caplog.at_level("WARNING", logger="saga.observe.observer"):
            async with observer:
                assert observer.stats.topics == []
                await asyncio.sleep(0.5)  # past the observer's first looks
                topic = await new_topic(1, prefix=prefix)
                envelope = stamped("order-late", SAGA_ENDED, {"status": "COMPLETED",
                                   "reason": None}, hop=0, when=datetime.now(UTC),
                                   service="order")  # fmt: skip
                await publish(kafka_settings, topic, [EnvelopeCodec(CODEC).encode(envelope)])
                deadline = time.monotonic() + 8
                while observer.stats.stored < 1:
                    assert time.monotonic() < deadline, f"not stored: {observer.stats}"
                    await asyncio.sleep(0.05)
        assert observer.stats.topics == [topic]
        messages = [r.getMessage() for r in caplog.records if r.name == "saga.observe.observer"]
        assert len([m for m in messages if "no topic matches" in m]) == 1, messages
        assert any(topic in m for m in messages), messages
        trace = await trace_from_log(engine, "order-late")
        assert trace is not None
        assert [e.message_id for e in trace.entries] == [envelope.id]
    finally:
        await engine.dispose()


async def _only_topic(kafka: KafkaSettings, prefix: str) -> str:
    (topic,) = await matching_topics(kafka, (prefix + "*",))
    return topic


@pytest.mark.slow
async def test_saga_observe_runs_as_a_process_and_stops_cleanly(
    sqlite_url: str, kafka_settings: KafkaSettings, new_topic: NewTopicFactory
) -> None:
    prefix, (first, second, _), _ = await publish_saga_records(kafka_settings, new_topic)
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=kafka_settings.bootstrap_servers)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "saga", "observe", "--database-url", sqlite_url,
        "--topics", prefix + "*", "--group", prefix + "cli",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    engine = create_engine(sqlite_url)
    try:
        async with asyncio.timeout(60):
            while True:
                trace = None
                with contextlib.suppress(Exception):  # tables not created yet
                    trace = await trace_from_log(engine, "order-1")
                if trace is not None and len(trace.entries) == 2:
                    break
                await asyncio.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await engine.dispose()
    assert process.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0].startswith(f"observing {prefix}")
    assert lines[-1] == "stored 3, duplicates 1, skipped 2"
    assert [e.message_id for e in trace.entries] == [first.id, second.id]


def test_the_public_surface_of_saga_observe_is_pinned() -> None:
    import saga.observe

    assert saga.observe.__all__ == [
        "FORMATS",
        "Graph",
        "ObservedMessage",
        "ObserverSettings",
        "ObserverStats",
        "SagaLog",
        "SagaObserver",
        "SagaSummary",
        "StatusReport",
        "Trace",
        "TraceEntry",
        "Waiting",
        "build_trace",
        "observed_graph",
        "render_graph",
        "render_trace",
        "saga_status",
        "trace_from_kafka",
        "trace_from_log",
        "trace_from_service",
    ]


async def test_a_batch_is_stored_whole_or_not_at_all(database_url: str) -> None:
    """The records of one fetch share a transaction: a failure mid-batch stores none of
    them, and the consumer's retry of the batch then stores each one once."""
    codec = EnvelopeCodec(CODEC)
    now = datetime.now(UTC)
    ended = {"status": "COMPLETED", "reason": None}
    envelopes = [
        stamped(f"order-{n}", SAGA_ENDED, ended, hop=0, when=now, service="order") for n in range(3)
    ]
    records = [
        consumer_record("saga.place_order", offset, *codec.encode(envelope))
        for offset, envelope in enumerate(envelopes)
    ]
    engine = create_engine(database_url)
    observer = await observer_on(engine)
    real = observer.log.record
    calls = 0

    async def fails_once_on_the_third(tx, message):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("the log's disk is full")
        await real(tx, message)

    observer.log.record = fails_once_on_the_third  # type: ignore[method-assign]
    try:
        with pytest.raises(RuntimeError):
            await observer.process_batch(records)
        assert await observer.log.summaries(engine) == []
        assert observer.stats.stored == 0
        await observer.process_batch(records)  # the consumer retries the batch
        summaries = await observer.log.summaries(engine)
        assert sorted(s.saga_id for s in summaries) == ["order-0", "order-1", "order-2"]
        assert (observer.stats.stored, observer.stats.duplicates) == (3, 0)
        await observer.process_batch(records)  # redelivered after the commit
        assert (observer.stats.stored, observer.stats.duplicates) == (3, 3)
    finally:
        await engine.dispose()


async def test_a_lost_connection_is_waited_out_not_reported_as_a_bug(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The server ends the observer's connection mid-batch (an outage, as in a
    restart): the batch is stored once the next connection works, the wait is a
    warning without a traceback, and nothing is logged as an error."""
    records = _ended_sagas(2)
    engine = create_engine(postgres_url)
    observer = await observer_on(engine)
    real = observer.log.record
    killed = 0

    async def terminated_once(tx, message):  # type: ignore[no-untyped-def]
        nonlocal killed
        if not killed:
            killed += 1
            await tx.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        await real(tx, message)

    observer.log.record = terminated_once  # type: ignore[method-assign]
    try:
        with caplog.at_level("WARNING", logger="saga.observe.observer"):
            await asyncio.wait_for(observer.process_batch(records), 30)
        summaries = await observer.log.summaries(engine)
        assert sorted(s.saga_id for s in summaries) == ["order-0", "order-1"]
        assert (observer.stats.stored, observer.stats.duplicates, killed) == (2, 0, 1)
        waits = [r for r in caplog.records if r.name == "saga.observe.observer"]
        assert [r.levelname for r in waits] == ["WARNING"]
        assert waits[0].exc_info is None
        assert "outage" in waits[0].getMessage()
    finally:
        await engine.dispose()


async def test_a_lock_that_is_never_released_reaches_the_consumer_as_an_error(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A forgotten session holds a lock on the log's inbox table; every try of the
    observer's batch ends in a lock timeout (55P03, transient). Retrying cannot
    end that: after a few tries the error reaches the consumer (which logs it as
    an error, with its traceback), instead of warnings
    without end that no alert on errors ever sees."""
    records = _ended_sagas(2)
    engine = create_engine(postgres_url, connect_args={"options": "-c lock_timeout=100"})
    observer = await observer_on(engine)
    libpq = make_url(postgres_url).set(drivername="postgresql").render_as_string(False)
    holder = psycopg.connect(libpq)
    try:
        holder.execute("LOCK TABLE inbox IN ACCESS EXCLUSIVE MODE")
        with (
            caplog.at_level("WARNING", logger="saga.observe.observer"),
            pytest.raises(Exception, match="lock timeout"),
        ):
            await asyncio.wait_for(observer.process_batch(records), 30)
        waits = [r for r in caplog.records if r.name == "saga.observe.observer"]
        assert 1 <= len(waits) <= 5
        assert observer.stats.stored == 0
    finally:
        holder.close()
        await engine.dispose()


async def test_a_deadline_message_is_traced_when_it_was_due_not_when_it_was_written(
    sqlite_url: str, kafka_settings: KafkaSettings, new_topic: NewTopicFactory
) -> None:
    """The initiator writes the deadline message with the first event, but the relay
    publishes it only once due: the trace puts it there, from the log and the topics."""
    prefix = f"saga{uuid.uuid4().hex[:8]}."
    topic = await new_topic(1, prefix=prefix)
    codec = EnvelopeCodec(CODEC)
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=5)
    due = start + timedelta(seconds=3)
    first = stamped("order-9", COMPENSATE, {"step": "reserve_stock", "reason": "r"}, hop=0,
                    when=start, service="order")  # fmt: skip
    ended = stamped("order-9", SAGA_ENDED, {"status": "COMPLETED", "reason": None}, hop=1,
                    when=start + timedelta(milliseconds=100), service="inventory",
                    causation=first.id)  # fmt: skip
    assert ended.stamp is not None
    ended = replace(ended, stamp=replace(ended.stamp, status=SagaStatus.COMPLETED))
    # Written a millisecond after the first event, with its stamp; published when due.
    deadline = replace(
        stamped("order-9", DEADLINE_REACHED, {"deadline": due}, hop=0,
                when=start + timedelta(milliseconds=1), service="order", causation=first.id),
        stamp=first.stamp,
    )  # fmt: skip
    await publish(kafka_settings, topic, [codec.encode(e) for e in (first, ended, deadline)])
    engine = create_engine(sqlite_url)
    observer = await observer_on(engine, kafka_settings, prefix)
    try:
        async with observer:
            async with asyncio.timeout(30):
                while observer.stats.stored < 3:
                    await asyncio.sleep(0.05)
        from_log = await trace_from_log(engine, "order-9")
        from_kafka = await trace_from_kafka(kafka_settings, CODEC, "order-9",
                                            patterns=(prefix + "*",))  # fmt: skip
        assert from_log is not None
        assert from_kafka is not None
        assert from_log.to_dict() == from_kafka.to_dict()
        # Last, at its due time, after the saga ended; labelled with when it was due.
        last = from_log.to_dict()["timeline"][-1]
        label = f"DeadlineReached(due {due.isoformat(timespec='milliseconds')})"
        assert (last["event"], last["delta_ms"], last["hop"]) == (label, 3000, 0)
        assert last["time"] == due.isoformat(timespec="milliseconds")
        assert [e.event for e in from_log.entries[:-1]] == [
            "Compensate(step=reserve_stock)",
            "SagaEnded(status=COMPLETED)",
        ]
        assert re.search(rf"^\S+ +\+3000 +0 +order +{re.escape(label)}$",
                         render_trace(from_log, "table"), re.MULTILINE)  # fmt: skip
        assert f"order->>saga_topic: +3000ms {label}" in render_trace(from_log, "mermaid")
        # The saga took 100 ms: a deadline message after its end does not lengthen it.
        metrics = await saga_metrics(engine)
        assert metrics["time_to_end"]["place_order"]["COMPLETED"]["max_seconds"] == 0.1
    finally:
        await engine.dispose()


_LOG_TOPIC = "saga.place_order"


def _log_records(*envelopes, topic=_LOG_TOPIC):  # type: ignore[no-untyped-def]
    codec = EnvelopeCodec(CODEC)
    out = []
    for offset, envelope in enumerate(envelopes):
        key, value, headers = codec.encode(envelope)
        out.append(consumer_record(topic, offset, key, value, headers))
    return out


def _ended_sagas(count: int) -> list[Any]:
    """Records of ``count`` sagas' end messages (order-0, order-1, ...)."""
    now = datetime.now(UTC)
    ended = {"status": "COMPLETED", "reason": None}
    return _log_records(*(
        stamped(f"order-{n}", SAGA_ENDED, ended, hop=0, when=now, service="order")
        for n in range(count)
    ))  # fmt: skip


async def test_a_deadline_due_after_its_saga_was_purged_does_not_bring_it_back_as_running(
    sqlite_url: str,
) -> None:
    """A saga ended 10 days ago with a 10-day deadline; retention (7 days) forgot it.
    Its deadline message, published now, must not make 'saga status' report a
    running (soon stuck) saga that ended long ago."""
    engine = create_engine(sqlite_url)
    observer = await observer_on(engine)
    try:
        start = datetime.now(UTC) - timedelta(days=10)
        first = stamped("order-7", "choreosaga.saga.Compensate",
                        {"step": "reserve_stock", "reason": "r"}, hop=0, when=start,
                        service="order")  # fmt: skip
        ended = stamped("order-7", SAGA_ENDED, {"status": "COMPLETED", "reason": None}, hop=1,
                        when=start + timedelta(seconds=1), service="order",
                        causation=first.id)  # fmt: skip
        assert ended.stamp is not None
        ended = replace(ended, stamp=replace(ended.stamp, status=SagaStatus.COMPLETED))
        due = datetime.now(UTC) - timedelta(seconds=1)
        deadline = replace(
            stamped("order-7", DEADLINE_REACHED, {"deadline": due}, hop=0, when=start,
                    service="order", causation=first.id),
            stamp=first.stamp,
        )  # fmt: skip
        first_two = _log_records(first, ended)
        await observer.process_batch(first_two)
        assert await observer.cleanup() == 1  # ended 10 days ago: forgotten
        (late,) = _log_records(deadline)
        await observer.process_batch([replace(late, offset=2)])
        report = await saga_status(engine, stuck_after=timedelta(seconds=0))
        running = [c for c in report.counts if c[1] == "RUNNING"]
        assert running == [], report.to_text()
        assert not any(report.attention.values()), report.to_text()
    finally:
        await engine.dispose()


async def test_a_superseded_deadline_message_does_not_hide_a_stuck_saga(sqlite_url: str) -> None:
    """The saga resumed (its deadline moved from D1 to D2) and then stopped moving.
    The old deadline message, published at D1, is superseded and changes nothing at
    the initiator: 'saga status' must still report the saga as stuck."""
    engine = create_engine(sqlite_url)
    observer = await observer_on(engine)
    try:
        now = datetime.now(UTC).replace(microsecond=0)
        start = now - timedelta(minutes=20)
        d1, d2 = now - timedelta(minutes=1), now + timedelta(minutes=30)
        first = stamped("order-8", "choreosaga.saga.Compensate",
                        {"step": "reserve_stock", "reason": "r"}, hop=0, when=start,
                        service="order")  # fmt: skip
        assert first.stamp is not None
        first = replace(first, stamp=replace(first.stamp, deadline=d1))
        resumed = stamped("order-8", "choreosaga.saga.SagaResumed",
                          {"service": "order", "message_id": "m", "at": start},
                          hop=1, when=start + timedelta(minutes=2), service="order",
                          causation=first.id)  # fmt: skip
        assert resumed.stamp is not None
        resumed = replace(resumed, stamp=replace(resumed.stamp, deadline=d2))
        old_deadline = replace(
            stamped("order-8", DEADLINE_REACHED, {"deadline": d1}, hop=0, when=start,
                    service="order", causation=first.id),
            stamp=first.stamp,
        )  # fmt: skip
        records = _log_records(first, resumed, old_deadline)
        await observer.process_batch(records)
        report = await saga_status(engine, stuck_after=timedelta(minutes=5))
        stuck = [s.saga_id for s in report.attention.get("stuck", [])]
        assert stuck == ["order-8"], report.to_text()
    finally:
        await engine.dispose()


async def test_a_deadline_moved_on_a_resume_is_the_one_the_log_shows_in_any_order_observed(
    sqlite_url: str,
) -> None:
    """The initiator was suspended past the saga's deadline D1; the replay resumed the saga
    and moved the deadline to D2. The initiator's SagaResumed carries D2; the payment
    service, whose view still holds D1, reports its step after it; the superseded deadline
    message (D1) is published late. The log shows D2, and so does the trace, whether the
    messages are observed in that order or the latest first (messages keyed otherwise than
    by the saga id travel on other partitions)."""
    engine = create_engine(sqlite_url)
    observer = await observer_on(engine)
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(minutes=20)
    d1, d2 = now - timedelta(minutes=1), now + timedelta(minutes=30)

    def story(saga_id: str) -> list[Envelope]:
        def message(event_type: str, data: dict[str, object], *, service: str, hop: int,
                    after: timedelta, deadline: datetime) -> Envelope:  # fmt: skip
            envelope = stamped(saga_id, event_type, data, hop=hop, when=start + after,
                               service=service)  # fmt: skip
            assert envelope.stamp is not None
            stamp = replace(envelope.stamp, started_at=start, deadline=deadline)
            return replace(envelope, stamp=stamp)

        order = {"order_id": saga_id, "amount_cents": 1200}
        placed = message(
            "choreosaga.shop.OrderPlaced",
            {**order, "customer": "c", "sku": "s", "quantity": 1, "card": "tok", "address": "a"},
            service="order", hop=0, after=timedelta(0), deadline=d1,
        )  # fmt: skip
        reserved = message(
            "choreosaga.shop.StockReserved",
            {**order, "reservation_id": "r", "card": "tok", "address": "a"},
            service="inventory", hop=1, after=timedelta(minutes=1), deadline=d1,
        )  # fmt: skip
        resumed = message(
            "choreosaga.saga.SagaResumed",
            {"service": "order", "message_id": "m", "at": start + timedelta(minutes=10)},
            service="order", hop=2, after=timedelta(minutes=10), deadline=d2,
        )  # fmt: skip
        charged = message(
            "choreosaga.shop.PaymentCharged",
            {**order, "payment_id": "p", "address": "a"},
            service="payment", hop=2, after=timedelta(minutes=11), deadline=d1,
        )  # fmt: skip
        superseded = replace(
            message(DEADLINE_REACHED, {"deadline": d1}, service="order", hop=0,
                    after=timedelta(0), deadline=d1),
            stamp=placed.stamp,
        )  # fmt: skip
        return [placed, reserved, resumed, charged, superseded]

    placed, reserved, resumed, charged, superseded = story("order-10")
    in_order = _log_records(placed, reserved, resumed, charged, superseded)
    placed, reserved, resumed, charged, superseded = story("order-11")
    latest_first = _log_records(resumed, charged, superseded, placed, reserved)
    try:
        await observer.process_batch(in_order)
        await observer.process_batch([replace(r, offset=r.offset + 5) for r in latest_first])
        summaries = {s.saga_id: s for s in await observer.log.summaries(engine)}
        for saga_id in ("order-10", "order-11"):
            assert summaries[saga_id].stamp.deadline == d2, saga_id
            trace = await trace_from_log(engine, saga_id)
            assert trace is not None
            assert trace.waiting is not None
            assert trace.waiting.deadline == d2, saga_id
            assert f"(deadline {d2.isoformat(timespec='milliseconds')})" in trace.explanation()
    finally:
        await engine.dispose()


def _order_7(
    saga: str, start: datetime, *, deadline: datetime, ended: SagaStatus
) -> list[Envelope]:
    """Saga ``saga`` with the id ``order-7`` (correlation ``corr-<saga>``): its first
    message and its end, a second later, with status ``ended``."""
    correlation = f"corr-{saga}"
    first = stamped("order-7", COMPENSATE, {"step": "reserve_stock", "reason": "r"}, hop=0,
                    when=start, service="order", saga=saga, correlation=correlation)  # fmt: skip
    end = stamped("order-7", SAGA_ENDED, {"status": ended.value, "reason": None}, hop=1,
                  when=start + timedelta(seconds=1), service="inventory", causation=first.id,
                  saga=saga, correlation=correlation)  # fmt: skip
    assert first.stamp is not None
    assert end.stamp is not None
    steps = end.stamp.steps
    if ended is SagaStatus.COMPENSATED:
        undone = replace(steps[0], outcome=StepOutcome.COMPENSATED)
        steps = (*steps, undone)
    first = replace(first, stamp=replace(first.stamp, deadline=deadline))
    stamp = replace(end.stamp, status=ended, steps=steps, started_at=start, deadline=deadline)
    return [first, replace(end, stamp=stamp)]


async def test_two_sagas_of_different_names_sharing_an_id_are_two_sagas_in_the_log(
    database_url: str,
) -> None:
    """A saga is (name, id): place_order and cancel_order of order 7 both use the id
    order-7. The log keeps each with its own status and deadline (not cancel_order's
    3 days on the 5-minute place_order), 'saga status' counts both, a trace shows one
    saga's messages only, by id and name or by correlation id, and a trace by the id
    alone is refused, naming both sagas."""
    engine = create_engine(database_url)
    observer = await observer_on(engine)
    now = datetime.now(UTC).replace(microsecond=0)
    five_minutes, three_days = now + timedelta(minutes=5), now + timedelta(days=3)
    place = _order_7("place_order", now, deadline=five_minutes, ended=SagaStatus.COMPLETED)
    cancel = _order_7("cancel_order", now, deadline=three_days, ended=SagaStatus.COMPENSATED)
    try:
        await observer.process_batch(_log_records(*place))
        await observer.process_batch(_log_records(*cancel, topic="saga.cancel_order"))
        sagas = {
            (s.saga_name, s.saga_id): (s.status, s.stamp.deadline, s.messages)
            for s in await observer.log.summaries(engine)
        }
        assert sagas == {
            ("place_order", "order-7"): ("COMPLETED", five_minutes, 2),
            ("cancel_order", "order-7"): ("COMPENSATED", three_days, 2),
        }
        report = await saga_status(engine)
        assert report.counts == [
            ("cancel_order", "COMPENSATED", 1),
            ("place_order", "COMPLETED", 1),
        ]
        for name, messages in (("place_order", place), ("cancel_order", cancel)):
            for trace in (
                await trace_from_log(engine, "order-7", saga=name),
                await trace_from_log(engine, f"corr-{name}"),
            ):
                assert trace is not None
                assert trace.saga_name == name
                assert [e.message_id for e in trace.entries] == [m.id for m in messages]
        with pytest.raises(
            ConfigurationError,
            match=r"sagas of several names have id 'order-7' \(cancel_order, place_order\)",
        ):
            await trace_from_log(engine, "order-7")
        assert await trace_from_log(engine, "order-7", saga="refund_order") is None
    finally:
        await engine.dispose()


async def test_retention_forgets_a_saga_not_another_one_with_the_same_id(sqlite_url: str) -> None:
    """place_order order-7 ended ten days ago; cancel_order order-7 started now. Retention
    (7 days) forgets place_order and none of cancel_order's messages."""
    engine = create_engine(sqlite_url)
    observer = await observer_on(engine)
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(days=10)
    place = _order_7("place_order", start, deadline=start + timedelta(minutes=5),
                     ended=SagaStatus.COMPLETED)  # fmt: skip
    cancel = stamped("order-7", COMPENSATE, {"step": "reserve_stock", "reason": "r"}, hop=0,
                     when=now, service="order", saga="cancel_order")  # fmt: skip
    try:
        await observer.process_batch(_log_records(*place))
        await observer.process_batch(_log_records(cancel, topic="saga.cancel_order"))
        assert await observer.cleanup() == 1
        summaries = await observer.log.summaries(engine)
        assert [(s.saga_name, s.saga_id) for s in summaries] == [("cancel_order", "order-7")]
        trace = await trace_from_log(engine, "order-7")
        assert trace is not None
        assert (trace.saga_name, [e.message_id for e in trace.entries]) == (
            "cancel_order",
            [cancel.id],
        )
    finally:
        await engine.dispose()


async def test_a_scan_of_the_topics_traces_one_of_two_sagas_sharing_an_id(
    kafka_settings: KafkaSettings, new_topic: NewTopicFactory
) -> None:
    """saga trace --from-kafka: the saga named, not every message keyed order-7; without
    a name the scan is refused, naming both sagas, as the trace from the log is."""
    prefix = f"saga{uuid.uuid4().hex[:8]}."
    now = datetime.now(UTC).replace(microsecond=0)
    place = _order_7("place_order", now, deadline=now + timedelta(minutes=5),
                     ended=SagaStatus.COMPLETED)  # fmt: skip
    cancel = _order_7("cancel_order", now, deadline=now + timedelta(days=3),
                      ended=SagaStatus.COMPENSATED)  # fmt: skip
    codec = EnvelopeCodec(CODEC)
    for messages in (place, cancel):
        topic = await new_topic(1, prefix=prefix)
        await publish(kafka_settings, topic, [codec.encode(m) for m in messages])
    patterns = (prefix + "*",)
    with pytest.raises(ConfigurationError, match=r"\(cancel_order, place_order\)"):
        await trace_from_kafka(kafka_settings, CODEC, "order-7", patterns=patterns)
    trace = await trace_from_kafka(kafka_settings, CODEC, "order-7", saga="cancel_order",
                                   patterns=patterns)  # fmt: skip
    assert trace is not None
    assert (trace.saga_name, trace.status) == ("cancel_order", SagaStatus.COMPENSATED)
    assert [e.message_id for e in trace.entries] == [m.id for m in cancel]


async def test_a_saga_log_keyed_by_the_saga_id_alone_is_refused_with_the_sql_that_migrates_it(
    database_url: str,
) -> None:
    """A log made by an earlier version keys its sagas by id alone. The observer refuses it
    (its upserts would fail on every message) in one line giving the SQL that migrates it;
    once that has run, the log keeps the sagas it had and takes two sagas of one id."""
    engine = create_engine(database_url)
    try:
        await create_saga_log_keyed_by_id(engine)
        observer = SagaObserver(
            engine=engine,
            kafka=KafkaSettings(),
            codec=CODEC,
            settings=ObserverSettings(patterns=("saga.*",), group_id="saga.observer"),
        )
        with pytest.raises(ConfigurationError) as refused:
            await observer.create_tables()
        message = str(refused.value)
        assert "\n" not in message
        assert "saga_log_sagas" in message
        assert "(saga_name, saga_id)" in message
        marker = "give it the key (saga_name, saga_id): "
        sql = message[message.index(marker) + len(marker) :]
        # The README gives the same SQL.
        readme = (Path(__file__).parent.parent / "README.md").read_text()
        notes = readme[readme.index("The saga log (`saga observe`) keys its sagas table") :]
        postgresql, sqlite = re.findall(r"```sql\n(.*?)```", notes, re.DOTALL)[:2]
        documented = postgresql if engine.dialect.name == "postgresql" else sqlite
        assert " ".join(documented.split()) == sql
        async with engine.begin() as conn:  # (SQLite's BEGIN IMMEDIATE and COMMIT: this one)
            for statement in sql.split(";"):
                if statement.strip() and statement.strip() not in ("BEGIN IMMEDIATE", "COMMIT"):
                    await conn.exec_driver_sql(statement)
        await observer.create_tables()
        now = datetime.now(UTC).replace(microsecond=0)
        place = _order_7("place_order", now, deadline=now + timedelta(minutes=5),
                         ended=SagaStatus.COMPLETED)  # fmt: skip
        cancel = _order_7("cancel_order", now, deadline=now + timedelta(days=3),
                          ended=SagaStatus.COMPENSATED)  # fmt: skip
        await observer.process_batch(_log_records(*place))
        await observer.process_batch(_log_records(*cancel, topic="saga.cancel_order"))
        sagas = [(s.saga_name, s.saga_id, s.status) for s in await observer.log.summaries(engine)]
        assert sorted(sagas) == [
            ("cancel_order", "order-7", "COMPENSATED"),
            ("place_order", "order-1", "RUNNING"),
            ("place_order", "order-7", "COMPLETED"),
        ]
    finally:
        await engine.dispose()


# -- Third review: the saga log keyed by (name, id) and the migration of earlier logs ------


async def _as_an_earlier_version_made_it(engine: AsyncEngine, log: SagaLog) -> None:
    """Give ``log``'s sagas table the shape and rows the previous version had: keyed by
    the saga id, one row per id (its upserts merged sagas of several names with one id
    into the row of the first one seen, counting all their messages)."""
    async with engine.begin() as conn:
        rows = (await conn.execute(select(log.sagas).order_by(log.sagas.c.started_at_ms))).all()
        await conn.run_sync(lambda c: log.sagas.drop(c))
        old = sagas_keyed_by_id(sa.MetaData(schema=log.sagas.schema), log.sagas.name)
        await conn.run_sync(lambda c: old.create(c))
        merged: dict[str, dict[str, Any]] = {}
        for row in rows:
            values = dict(row._mapping)
            first = merged.setdefault(row.saga_id, values)
            if first is not values:
                first["messages"] += values["messages"]
                first["last_message_ms"] = max(first["last_message_ms"], values["last_message_ms"])
        await conn.execute(old.insert(), list(merged.values()))


def _observer_with(engine: AsyncEngine, log: SagaLog) -> SagaObserver:
    """An observer writing ``log``, handed its records directly."""
    settings = ObserverSettings(group_id="saga.observer")
    return SagaObserver(engine=engine, kafka=KafkaSettings(), codec=CODEC, settings=settings,
                        log_tables=log)  # fmt: skip


async def _migrate(engine: AsyncEngine, log: SagaLog) -> None:
    """Run the SQL the refusal gives, as its reader would (one transaction)."""
    with pytest.raises(ConfigurationError) as refused:
        await log.check_keys(engine)
    message = str(refused.value)
    marker = "give it the key (saga_name, saga_id): "
    sql = message[message.index(marker) + len(marker) :]
    async with engine.begin() as conn:  # (SQLite's BEGIN IMMEDIATE and COMMIT: this one)
        for statement in sql.split(";"):
            if statement.strip() and statement.strip() not in ("BEGIN IMMEDIATE", "COMMIT"):
                await conn.exec_driver_sql(statement)
    await log.check_keys(engine)


async def test_retention_forgets_the_messages_of_a_saga_an_earlier_version_merged_into_another(
    database_url: str,
) -> None:
    """place_order and cancel_order of order 7 both ended ten days ago, logged by the
    previous version: their messages, and one row for order-7 (place_order's, the one seen
    first). After the migration, retention (7 days) forgets that row and its messages, and
    must forget cancel_order's too: the log has no row of cancel_order order-7 to age them
    by, and no message of that saga will ever come to make one. README: 'saga log | sagas
    (of any status) with no message since, and their messages'."""
    engine = create_engine(database_url)
    observer = await observer_on(engine)
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=10)
    place = _order_7("place_order", start, deadline=start + timedelta(minutes=5),
                     ended=SagaStatus.COMPLETED)  # fmt: skip
    cancel = _order_7("cancel_order", start + timedelta(seconds=5),
                      deadline=start + timedelta(days=3), ended=SagaStatus.COMPENSATED)  # fmt: skip
    try:
        await observer.process_batch(_log_records(*place))
        await observer.process_batch(_log_records(*cancel, topic="saga.cancel_order"))
        await _as_an_earlier_version_made_it(engine, observer.log)
        await _migrate(engine, observer.log)
        assert [(s.saga_name, s.messages) for s in await observer.log.summaries(engine)] == [
            ("place_order", 4)
        ]

        assert await observer.cleanup() == 1
        assert await observer.log.summaries(engine) == []
        m = observer.log.messages.c
        async with engine.connect() as conn:
            left = (await conn.execute(select(m.saga_name, m.event_type))).all()
        assert left == []  # cancel_order's messages stay forever
        assert await trace_from_log(engine, "order-7") is None
    finally:
        await engine.dispose()


async def test_a_saga_log_of_an_earlier_version_in_a_schema_is_refused(postgres_url: str) -> None:
    """A saga log on a MetaData with a schema (PostgreSQL), made by the previous version:
    the check must read the log's own table, not one of that name on the search path
    (here, none), and refuse it with SQL naming it in its schema. Otherwise the observer
    starts and its upserts fail on every message."""
    engine = create_engine(postgres_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE SCHEMA logs"))
        log = SagaLog(sa.MetaData(schema="logs"), dialect="postgresql")
        observer = _observer_with(engine, log)
        await observer.create_tables()
        now = datetime.now(UTC).replace(microsecond=0)
        await observer.process_batch(_log_records(*_order_7(
            "place_order", now, deadline=now + timedelta(minutes=5), ended=SagaStatus.COMPLETED
        )))  # fmt: skip
        await _as_an_earlier_version_made_it(engine, log)

        with pytest.raises(ConfigurationError) as refused:
            await log.create_tables(engine)
        assert "logs.saga_log_sagas" in str(refused.value)
    finally:
        await engine.dispose()


async def test_a_saga_log_in_a_schema_is_not_refused_for_an_earlier_version_s_table_elsewhere(
    postgres_url: str,
) -> None:
    """A saga log of this version in schema 'logs'; in 'public', a log the previous
    version made (another team's, or the one this replaced). The check reads the table
    in 'public', refuses the good log, and its SQL would alter the other one."""
    engine = create_engine(postgres_url)
    try:
        await create_saga_log_keyed_by_id(engine)  # in public
        async with engine.begin() as conn:
            await conn.execute(text("CREATE SCHEMA logs"))
        log = SagaLog(sa.MetaData(schema="logs"), dialect="postgresql")
        await log.create_tables(engine)  # refused: "ALTER TABLE saga_log_sagas DROP ..."
        assert await log.summaries(engine) == []
    finally:
        await engine.dispose()


async def test_the_sql_that_migrates_a_log_of_an_earlier_version_runs_for_any_table_name(
    database_url: str,
) -> None:
    """Table names are validated (a-z, 0-9, _), which lets SQL keywords through: 'order'
    is a fine name for the sagas table, and every statement of the log quotes it, but the
    migration SQL given in the refusal does not (ALTER TABLE order ...: a syntax error on
    both databases; in sqlite3, which goes on after an error, its index statements still
    run)."""
    engine = create_engine(database_url)
    log = SagaLog(dialect=engine.dialect.name, messages="saga_log", sagas="order")
    observer = _observer_with(engine, log)
    now = datetime.now(UTC).replace(microsecond=0)
    try:
        await observer.create_tables()
        await observer.process_batch(_log_records(*_order_7(
            "place_order", now, deadline=now + timedelta(minutes=5), ended=SagaStatus.COMPLETED
        )))  # fmt: skip
        await _as_an_earlier_version_made_it(engine, log)
        await _migrate(engine, log)
        assert [(s.saga_name, s.saga_id) for s in await log.summaries(engine)] == [
            ("place_order", "order-7")
        ]
    finally:
        await engine.dispose()


async def test_an_observer_started_on_a_log_of_an_earlier_version_refuses_it(
    sqlite_url: str, kafka_settings: KafkaSettings
) -> None:
    """Tables managed elsewhere (Alembic: 'tables on a MetaData you can hand to Alembic'),
    so create_tables is not called: started on a log the previous version made, the
    observer must refuse it at once, in one line with the SQL, as create_tables does.
    It starts instead, and each batch then fails ('ON CONFLICT clause does not match any
    PRIMARY KEY or UNIQUE constraint') and is retried and logged without end."""
    engine = create_engine(sqlite_url)
    try:
        await create_saga_log_keyed_by_id(engine)
        prefix = f"saga{uuid.uuid4().hex[:8]}."
        observer = SagaObserver(
            engine=engine,
            kafka=kafka_settings,
            codec=CODEC,
            settings=ObserverSettings(patterns=(prefix + "*",), group_id=prefix + "observer"),
        )
        async with engine.begin() as conn:
            await conn.run_sync(lambda c: observer.tables.inbox.create(c))  # by Alembic
        with pytest.raises(ConfigurationError, match="ALTER TABLE saga_log_sagas"):
            async with observer:
                pass
    finally:
        await engine.dispose()


async def test_a_trace_from_a_service_s_database_by_a_shared_correlation_id_is_the_earliest_saga(
    sqlite_url: str,
) -> None:
    """README (saga trace): 'a correlation id shared by several sagas traces the earliest',
    as the trace from the log does. From a service's own database it traces the saga whose
    view changed least recently instead: here cancel_order, started a minute after
    place_order, whose view place_order's later step has since moved past."""
    from outbox.tables import create_tables
    from saga.state import SagaStates, SagaView

    engine = create_engine(sqlite_url)
    states = SagaStates(sa.MetaData(), CODEC, dialect=engine.dialect.name)
    now = datetime.now(UTC).replace(microsecond=0)

    def view(saga: str, saga_id: str, started: datetime) -> SagaView:
        envelope = stamped(saga_id, COMPENSATE, {"step": "s", "reason": "r"}, hop=0,
                           when=started, service="order", saga=saga,
                           correlation="basket-1")  # fmt: skip
        assert envelope.stamp is not None
        return SagaView(stamp=envelope.stamp)

    try:
        await create_tables(engine, [states.table])
        async with engine.begin() as conn:
            await states.save(conn, view("place_order", "order-1", now - timedelta(minutes=2)))
        await asyncio.sleep(0.01)
        async with engine.begin() as conn:
            await states.save(conn, view("cancel_order", "cancel-1", now - timedelta(minutes=1)))
        await asyncio.sleep(0.01)
        async with engine.begin() as conn:  # place_order's next step
            await states.save(conn, view("place_order", "order-1", now - timedelta(minutes=2)))

        trace = await trace_from_service(engine, CODEC, "basket-1")
        assert trace is not None
        assert (trace.saga_name, trace.saga_id) == ("place_order", "order-1")
    finally:
        await engine.dispose()
