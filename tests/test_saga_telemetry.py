"""OpenTelemetry spans and metrics of the reference shop: real databases, the real broker."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
import pytest_asyncio
from aiokafka import AIOKafkaProducer
from conftest import PostgresDatabases, settings_for_tests
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support import read_topic

from saga import RelaySettings, ServiceSettings, ensure_topics
from saga.telemetry import ServiceTelemetry, instrument
from services import SAGA
from services.scenarios import OrderRequest, Scenario, order_for
from services.shop import SERVICES, Shop

pytestmark = pytest.mark.asyncio(loop_scope="module")


@dataclass
class Run:
    shop: Shop
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader
    telemetry: list[ServiceTelemetry]
    orders: dict[Scenario, OrderRequest]
    prefix: str


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def run(kafka_bootstrap: str, postgres_databases: PostgresDatabases) -> AsyncIterator[Run]:
    kafka = settings_for_tests(kafka_bootstrap)
    prefix = f"t{uuid.uuid4().hex[:8]}."
    await ensure_topics(kafka, {prefix + SAGA: 4})
    shop = Shop(
        urls={name: postgres_databases.new() for name in SERVICES},
        kafka=kafka,
        settings=ServiceSettings(
            saga_topic_prefix=prefix,
            group_prefix=prefix,
            relay=RelaySettings(poll_interval=timedelta(milliseconds=200)),
        ),
        deadline=timedelta(seconds=60),
    )
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    telemetry = [
        instrument(s.service, tracer_provider=tracer_provider, meter_provider=meter_provider)
        for s in shop.all
    ]
    await shop.setup()
    await shop.start()
    tracer = tracer_provider.get_tracer("test")
    orders = {
        scenario: order_for(scenario, number)
        for number, scenario in enumerate((Scenario.COMPLETED, Scenario.SHIPMENT_IMPOSSIBLE))
    }
    try:
        for order in orders.values():
            # The request that places the order: its trace is the saga's.
            with tracer.start_as_current_span(f"place {order.order_id}"):
                await shop.order.place(order)
        async with asyncio.timeout(60):
            await shop.wait_terminal(len(orders))
        yield Run(shop, spans, reader, telemetry, orders, prefix)
    finally:
        await shop.stop()


def tree(spans: list[ReadableSpan], root_name: str) -> str:
    """The trace under ``root_name`` as indented text; consumers that did nothing are left out.

    Siblings run in parallel in different services: they are sorted by text.
    """
    (root,) = [s for s in spans if s.name == root_name]
    assert root.context is not None
    in_trace = [
        s for s in spans if s.context is not None and s.context.trace_id == root.context.trace_id
    ]
    children: dict[int, list[ReadableSpan]] = defaultdict(list)
    for span in in_trace:
        if span.parent is not None:
            children[span.parent.span_id].append(span)

    def label(span: ReadableSpan) -> str:
        attributes: dict[str, Any] = dict(span.attributes or {})
        if span.name == "outbox write":
            return f"outbox write ({attributes['messaging.batch.message_count']})"
        if span.name.endswith(" process"):
            group = str(attributes["messaging.consumer.group.name"]).split(".")[-1]
            event = str(attributes["cloudevents.event_type"]).rsplit(".", 1)[-1]
            step = attributes.get("saga.step")
            return f"{group} process {event}" + (f" [{step}]" if step else "")
        return span.name

    def busy(span: ReadableSpan) -> bool:
        return (span.attributes or {}).get("saga.outcome") != "ignored"

    def lines(span: ReadableSpan, depth: int) -> list[str]:
        assert span.context is not None
        below = [c for c in children[span.context.span_id] if busy(c)]
        out = ["  " * depth + label(span)]
        ordered = sorted((lines(c, depth + 1) for c in below), key=lambda x: (x[0].strip(), x))
        # The handler's own outbox write first, then the consumers of what it wrote.
        ordered.sort(key=lambda x: not x[0].strip().startswith("outbox write"))
        for text_ in ordered:
            out += text_
        return out

    return "\n".join(lines(root, 0))


async def test_a_compensated_saga_is_one_trace_across_the_four_services(run: Run) -> None:
    order = run.orders[Scenario.SHIPMENT_IMPOSSIBLE]
    # Every service reads the saga's topic; the initiator follows every message,
    # and every service hears compensation requests and the end, except what it
    # sent itself: the order service skips its OrderPlaced, inventory the
    # SagaEnded it announced (their views already hold those stamps).
    expected = "\n".join(
        [
            f"place {order.order_id}",
            "  outbox write (2)",
            "  inventory process OrderPlaced [reserve_stock]",
            "    outbox write (1)",
            "    order process StockReserved",
            "    payment process StockReserved [charge_payment]",
            "      outbox write (1)",
            "      order process PaymentCharged",
            "      shipping process PaymentCharged [create_shipment]",
            "        outbox write (1)",
            "        inventory process Compensate [charge_payment]",
            "        order process Compensate [charge_payment]",
            "        payment process Compensate [charge_payment]",
            "          outbox write (1)",
            "          inventory process Compensate [reserve_stock]",
            "            outbox write (1)",
            "            order process SagaEnded",
            "            payment process SagaEnded",
            "            shipping process SagaEnded",
            "          order process Compensate [reserve_stock]",
            "          payment process Compensate [reserve_stock]",
            "          shipping process Compensate [reserve_stock]",
            "        shipping process Compensate [charge_payment]",
        ]
    )
    # The last spans end a moment after their commits, which "quiet" does not
    # wait for: wait for the whole tree (half a second was a guess that a loaded
    # machine can miss), then compare it once more for the report.
    deadline = time.monotonic() + 30
    while tree(list(run.spans.get_finished_spans()), f"place {order.order_id}") != expected:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    spans = list(run.spans.get_finished_spans())
    assert tree(spans, f"place {order.order_id}") == expected
    consumer = next(
        s
        for s in spans
        if s.name.endswith(" process")
        and (s.attributes or {}).get("saga.step") == "create_shipment"
        and (s.attributes or {}).get("saga.id") == order.order_id
    )
    attributes = dict(consumer.attributes or {})
    assert attributes["messaging.system"] == "kafka"
    assert attributes["messaging.operation.type"] == "process"
    assert attributes["messaging.destination.name"] == run.prefix + SAGA
    assert attributes["saga.name"] == SAGA
    assert attributes["saga.id"] == order.order_id
    assert attributes["saga.status"] == "RUNNING"
    # The relay's publish spans are linked to the span that wrote each row.
    published = [
        s
        for s in spans
        if s.name.endswith(" publish") and (s.attributes or {}).get("saga.id") == order.order_id
    ]
    assert published
    by_id = {s.context.span_id: s for s in spans if s.context is not None}
    for span in published:
        (link,) = span.links
        assert link.context.span_id in by_id


async def test_metrics_count_handlers_sagas_duplicates_and_the_relay(run: Run) -> None:
    shop = run.shop
    # The first event delivered again: the inboxes of the services it concerns catch it.
    (first, *_) = await read_topic(shop.kafka, run.prefix + SAGA, 1)
    inventory = shop.inventory.service.stats
    caught = inventory.duplicates
    producer = AIOKafkaProducer(**shop.kafka.producer_kwargs())
    await producer.start()
    try:
        await producer.send_and_wait(
            first.topic, first.value, key=first.key, headers=list(first.headers)
        )
    finally:
        await producer.stop()
    async with asyncio.timeout(30):
        # "Quiet" alone would not wait for it: a duplicate is not counted as processed.
        while inventory.duplicates == caught:
            await asyncio.sleep(0.05)
        await shop.wait_quiet()
    for telemetry in run.telemetry:
        assert await telemetry.metrics.refresh_backlog() == (0, 0.0)
        assert await telemetry.metrics.refresh_in_flight() == {}  # every saga has ended
    data = run.reader.get_metrics_data()
    points: dict[str, list[Any]] = defaultdict(list)
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points[metric.name] += list(metric.data.data_points)

    def attrs(p: Any) -> dict[str, Any]:
        return dict(p.attributes)

    steps = {
        (attrs(p)["service"], attrs(p)["saga.step"])
        for p in points["saga.handler.duration"]
        if attrs(p)["saga.outcome"] == "processed"
    }
    assert steps >= {
        ("inventory", "reserve_stock"),
        ("payment", "charge_payment"),
        ("shipping", "create_shipment"),
        ("order", "complete_order"),
    }
    ended = {(attrs(p)["saga.status"], p.count) for p in points["saga.duration"]}
    assert ended == {("COMPLETED", 1), ("COMPENSATED", 1)}
    duplicates = {attrs(p)["service"]: p.value for p in points["saga.inbox.duplicates"]}
    # Services the message does not concern skip it before the inbox, and so
    # does the order service, which sent it (its view holds it already).
    assert duplicates == {"inventory": 1}
    published = sum(p.value for p in points["outbox.relay.published"])
    records = await read_topic(shop.kafka, run.prefix + SAGA, published)
    assert published == len(records) - 1  # all but the record sent again by hand
    backlog = {attrs(p)["service"]: p.value for p in points["outbox.backlog"]}
    assert backlog == {"order": 0, "inventory": 0, "payment": 0, "shipping": 0}


@pytest.mark.parametrize(
    "traceparent",
    [b"00-not-a-trace-context", b"00-" + b"f" * 600 + b"-01"],
    ids=["malformed", "oversized"],
)
async def test_a_broken_incoming_context_is_ignored_and_the_message_processed(
    run: Run, traceparent: bytes
) -> None:
    shop = run.shop
    # Its end was announced by inventory (the last undo), which the order
    # service processes; it skips the ends it announces itself.
    order = run.orders[Scenario.SHIPMENT_IMPOSSIBLE]
    (record, *_) = [
        r
        for r in await read_topic(shop.kafka, run.prefix + SAGA, 1)
        if dict(r.headers).get("ce_type") == b"choreosaga.saga.SagaEnded"
        and r.key == order.order_id.encode()
    ] or [None]
    assert record is not None
    # The same end announced again under a new id, with a broken trace context.
    headers = [
        (name, uuid.uuid4().hex.encode() if name == "ce_id" else value)
        for name, value in record.headers
        if name != "traceparent"
    ] + [("traceparent", traceparent)]
    processed = shop.order.service.stats.processed
    producer = AIOKafkaProducer(**shop.kafka.producer_kwargs())
    await producer.start()
    try:
        await producer.send_and_wait(record.topic, record.value, key=record.key, headers=headers)
    finally:
        await producer.stop()
    async with asyncio.timeout(20):
        while shop.order.service.stats.processed == processed:
            await asyncio.sleep(0.05)
    new_id = dict(headers)["ce_id"].decode()
    (span,) = [
        s
        for s in run.spans.get_finished_spans()
        if (s.attributes or {}).get("messaging.message.id") == new_id
        and "order" in str((s.attributes or {}).get("messaging.consumer.group.name"))
    ]
    assert span.parent is None  # a new trace: the broken context was not used
    assert span.context is not None
    assert span.context.trace_id != 0
    assert (span.attributes or {})["saga.outcome"] == "processed"
