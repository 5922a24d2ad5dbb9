"""Saga visibility on the reference shop: real PostgreSQL databases, the real broker.

One shop runs for the module with a saga observer writing its log to a
PostgreSQL database; the tests read sagas back with ``saga trace`` and
``saga status`` (as real processes, and through the Python API), from the
log and from the topics.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from conftest import PostgresDatabases, settings_for_tests
from sqlalchemy import delete

from saga import (
    AvroCodec,
    KafkaSettings,
    RelaySettings,
    SchemaRegistry,
    ServiceSettings,
    create_engine,
    ensure_topics,
)
from saga.observe import (
    ObserverSettings,
    SagaObserver,
    Trace,
    build_trace,
    saga_status,
    trace_from_kafka,
    trace_from_log,
)
from saga.observe.scan import scan_kafka
from services import SAGA
from services.scenarios import OrderRequest, Scenario, order_for
from services.shipping import ShippingService
from services.shop import SERVICES, Shop

pytestmark = pytest.mark.asyncio(loop_scope="module")

# Long: no saga of this module may reach it (a stopped service must be able
# to come back and let its saga complete).
DEADLINE = timedelta(seconds=40)
SCENARIOS = (Scenario.COMPLETED, Scenario.PAYMENT_DECLINED, Scenario.SHIPMENT_IMPOSSIBLE)


@dataclass
class Run:
    shop: Shop
    kafka: KafkaSettings
    prefix: str
    log_url: str
    observer: SagaObserver
    orders: dict[Scenario, OrderRequest]
    codec: AvroCodec


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def run(kafka_bootstrap: str, postgres_databases: PostgresDatabases) -> AsyncIterator[Run]:
    kafka = settings_for_tests(kafka_bootstrap)
    prefix = f"t{uuid.uuid4().hex[:8]}."
    await ensure_topics(kafka, {prefix + SAGA: 4})
    settings = ServiceSettings(
        saga_topic_prefix=prefix,
        group_prefix=prefix,
        relay=RelaySettings(poll_interval=timedelta(milliseconds=200)),
    )
    shop = Shop(
        urls={name: postgres_databases.new() for name in SERVICES},
        kafka=kafka,
        settings=settings,
        deadline=DEADLINE,
    )
    log_url = postgres_databases.new()
    log_engine = create_engine(log_url)
    codec = AvroCodec(SchemaRegistry.default())
    observer = SagaObserver(
        engine=log_engine,
        kafka=kafka,
        codec=codec,
        settings=ObserverSettings(patterns=(prefix + "*",), group_id=prefix + "observer"),
    )
    await observer.create_tables()
    await shop.setup()
    await shop.start()
    await observer.start()
    orders = {s: order_for(s, number) for number, s in enumerate(SCENARIOS)}
    try:
        await asyncio.gather(*(shop.order.place(r) for r in orders.values()))
        async with asyncio.timeout(60):
            await shop.wait_terminal(len(orders))
        yield Run(shop, kafka, prefix, log_url, observer, orders, codec)
    finally:
        await observer.stop()
        await shop.stop()
        await log_engine.dispose()


def saga_cli(*args: str, kafka: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if kafka is not None:
        env["KAFKA_BOOTSTRAP_SERVERS"] = kafka
        env.setdefault("KAFKA_ENABLE_IDEMPOTENCE", "false")  # the test broker has no producer ids
    return subprocess.run(
        [sys.executable, "-m", "saga", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


async def settled_traces(run: Run, ref: str, timeout: float = 30.0) -> tuple[Trace, Trace]:
    """The log's and the topics' trace of ``ref`` once the observer has caught up."""
    deadline = time.monotonic() + timeout
    while True:
        from_kafka = await trace_from_kafka(run.kafka, run.codec, ref, patterns=(run.prefix + "*",))
        from_log = await trace_from_log(run.observer.engine, ref)
        assert from_kafka is not None
        if from_log is not None and from_log.to_dict() == from_kafka.to_dict():
            return from_log, from_kafka
        assert time.monotonic() < deadline, "the saga log never caught up with the topics"
        await asyncio.sleep(0.3)


def story(trace: Trace) -> list[tuple[str, str, str | None, str | None, bool]]:
    """(service, event, step, outcome, compensation) of each message but the deadline."""
    return [
        (e.service, e.event, e.step, e.outcome, e.compensation)
        for e in trace.entries
        if e.event != "DeadlineReached"
    ]


async def test_trace_of_a_refunded_order_shows_every_step_and_compensation_in_order(
    run: Run,
) -> None:
    order = run.orders[Scenario.SHIPMENT_IMPOSSIBLE]
    from_log, _ = await settled_traces(run, order.order_id)

    assert story(from_log) == [
        ("order", "OrderPlaced", None, None, False),
        ("inventory", "StockReserved", "reserve_stock", "DONE", False),
        ("payment", "PaymentCharged", "charge_payment", "DONE", False),
        ("shipping", "Compensate(step=charge_payment)", "create_shipment", "FAILED", True),
        ("payment", "Compensate(step=reserve_stock)", "charge_payment", "COMPENSATED", True),
        ("inventory", "SagaEnded(status=COMPENSATED)", "reserve_stock", "COMPENSATED", True),
    ]
    assert from_log.status.value == "COMPENSATED"
    assert from_log.failed_step == ("create_shipment", "shipping")
    assert from_log.explanation().startswith(
        "COMPENSATED: step create_shipment (shipping) failed: shipment impossible"
    )
    assert from_log.missing_hops == ()
    assert from_log.missing_causes == ()
    assert [e.hop for e in from_log.entries if e.event != "DeadlineReached"] == list(range(6))
    deltas = [e.delta_ms for e in from_log.entries]
    assert deltas == sorted(deltas)
    assert len({e.trace_id for e in from_log.entries}) == 1  # one W3C trace per saga

    # The same answer from the command line, from either source, as JSON.
    logged = saga_cli("trace", order.order_id, "--database-url", run.log_url, "--format", "json")
    scanned = saga_cli(
        "trace",
        order.order_id,
        "--from-kafka",
        "--topics",
        run.prefix + "*",
        "--format",
        "json",
        kafka=run.kafka.bootstrap_servers,
    )
    assert logged.returncode == 0, logged.stderr
    assert scanned.returncode == 0, scanned.stderr
    assert json.loads(logged.stdout) == json.loads(scanned.stdout) == from_log.to_dict()
    table = saga_cli("trace", order.order_id, "--database-url", run.log_url)
    assert table.returncode == 0, table.stderr
    assert (
        "COMPENSATED: step create_shipment (shipping) failed: shipment impossible" in table.stdout
    )
    assert "missing messages: none" in table.stdout
    print(table.stdout)


async def test_a_message_missing_from_the_log_is_reported_as_a_missing_hop(run: Run) -> None:
    order = run.orders[Scenario.PAYMENT_DECLINED]
    from_log, _ = await settled_traces(run, order.order_id)
    charged = next(e for e in from_log.entries if e.step == "reserve_stock")
    assert charged.hop == 1

    log = run.observer.log
    async with run.observer.engine.begin() as conn:
        await conn.execute(
            delete(log.messages).where(log.messages.c.message_id == charged.message_id)
        )
    result = saga_cli("trace", order.order_id, "--database-url", run.log_url)
    assert result.returncode == 0, result.stderr
    assert "missing hops: 1" in result.stdout
    assert charged.message_id in result.stdout  # the cause of the next message, not seen
    trace = await trace_from_log(run.observer.engine, order.order_id)
    assert trace is not None
    assert trace.missing_hops == (1,)
    assert trace.missing_causes == (charged.message_id,)


async def test_a_trace_without_gaps_from_the_topics_after_a_removal_from_a_copy(run: Run) -> None:
    order = run.orders[Scenario.COMPLETED]
    messages = await scan_kafka(run.kafka, run.codec, order.order_id, patterns=(run.prefix + "*",))
    whole = build_trace(messages)
    assert whole is not None
    assert whole.complete
    assert whole.explanation() == "COMPLETED: every step done"
    last_hop = max(m.hop for m in messages)
    victim = next(m for m in messages if m.hop == 2)
    broken = build_trace([m for m in messages if m is not victim])
    assert broken is not None
    assert broken.missing_hops == (2,)
    assert last_hop >= 4


async def test_mermaid_diagram_names_every_service_and_draws_each_message(run: Run) -> None:
    order = run.orders[Scenario.SHIPMENT_IMPOSSIBLE]
    trace, _ = await settled_traces(run, order.order_id)
    result = saga_cli("trace", order.order_id, "--database-url", run.log_url, "--format", "mermaid")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "sequenceDiagram"
    participants = [
        m.group(1) for line in lines if (m := re.fullmatch(r"    participant (\w+) as .+", line))
    ]
    assert set(participants) >= {"order", "inventory", "payment", "shipping"}
    arrows = [
        re.fullmatch(r"    (\w+)(->>|-->>)(\w+): \+(\d+)ms (.+)", line)
        for line in lines
        if "->>" in line
    ]
    assert all(arrows), lines
    assert {a.group(1) for a in arrows if a} >= {"order", "inventory", "payment", "shipping"}
    assert {a.group(3) for a in arrows if a} <= set(participants)
    # The deadline message is written with the first event, not caused by consuming it.
    assert not [a.group(0) for a in arrows if a and a.group(1) == a.group(3)]
    # Every message is drawn; the compensation path is dashed.
    drawn = {a.group(5) for a in arrows if a}
    assert {
        e.event + (f" [{e.step} {e.outcome}]" if e.step else "") for e in trace.entries
    } <= drawn
    dashed = [a.group(5) for a in arrows if a and a.group(2) == "-->>"]
    assert dashed == [
        "Compensate(step=charge_payment) [create_shipment FAILED]",
        "Compensate(step=reserve_stock) [charge_payment COMPENSATED]",
        "SagaEnded(status=COMPENSATED) [reserve_stock COMPENSATED]",
    ]
    assert lines[-1].startswith("    Note over ")
    assert "COMPENSATED" in lines[-1]


async def test_a_saga_waiting_for_a_stopped_service_is_stuck_until_it_completes(
    run: Run,
) -> None:
    shop = run.shop
    await shop.shipping.service.stop()
    order = order_for(Scenario.COMPLETED, 100)
    await shop.order.place(order)
    threshold = timedelta(seconds=1)

    async def stuck_ids() -> list[str]:
        report = await saga_status(run.observer.engine, stuck_after=threshold)
        return [s.saga_id for s in report.attention["stuck"]]

    async with asyncio.timeout(30):
        while order.order_id not in await stuck_ids():
            await asyncio.sleep(0.2)
    result = saga_cli(
        "status", "--database-url", run.log_url, "--stuck-after", "1", "--json", "--metrics"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    (stuck,) = [s for s in report["stuck"] if s["saga_id"] == order.order_id]
    assert stuck["status"] == "RUNNING"
    assert stuck["last_step"] == {"step": "charge_payment", "service": "payment", "outcome": "DONE"}
    assert stuck["idle_seconds"] >= 1
    assert report["counts"][SAGA]["COMPENSATED"] == 2
    # Metrics read off the log: the saga waits after charge_payment; two were refunded.
    assert report["metrics"]["in_flight"][SAGA]["charge_payment"] >= 1
    refunded = report["metrics"]["time_to_end"][SAGA]["COMPENSATED"]
    assert refunded["count"] == 2
    assert 0 < refunded["p50_seconds"] <= refunded["max_seconds"]
    print(
        saga_cli("status", "--database-url", run.log_url, "--stuck-after", "1", "--metrics").stdout
    )

    # The shipping service comes back: the saga completes and leaves the list.
    shipping = ShippingService(
        engine=shop.engines["shipping"],
        kafka=run.kafka,
        codec=shop.codec,
        settings=shop.shipping.service.settings,
    )
    shop.shipping = shipping
    await shipping.service.start()
    async with asyncio.timeout(30):
        while (await shop.statuses())[order.order_id][0] != "completed":
            await asyncio.sleep(0.2)
        while order.order_id in await stuck_ids():
            await asyncio.sleep(0.2)
    report_after = await saga_status(run.observer.engine, stuck_after=threshold)
    assert ("place_order", "COMPLETED", 2) in report_after.counts


async def test_the_order_service_answers_where_is_my_order(run: Run) -> None:
    order = run.orders[Scenario.PAYMENT_DECLINED]
    answer = await run.shop.order.order_status(order.order_id)
    assert answer is not None
    assert answer["status"] == "rejected"
    assert answer["saga"] == "COMPENSATED: step charge_payment (payment) failed: payment declined"
    timeline = answer["timeline"]
    assert isinstance(timeline, list)
    assert [(e["service"], e["step"], e["outcome"]) for e in timeline] == [
        ("inventory", "reserve_stock", "DONE"),
        ("payment", "charge_payment", "FAILED"),
        ("inventory", "reserve_stock", "COMPENSATED"),
    ]
    assert await run.shop.order.order_status("order-unknown") is None


async def test_the_readme_lines_answer_where_is_my_order(
    run: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index("### Where is my order, in Python")
    match = re.compile(r"```python\n(.*?)```", re.DOTALL).search(readme, start)
    assert match is not None
    lines = match.group(1).strip().splitlines()
    assert len([line for line in lines if line.strip()]) == 5
    order = run.orders[Scenario.SHIPMENT_IMPOSSIBLE]
    await settled_traces(run, order.order_id)
    body = "\n".join("    " + line for line in lines).replace("order-00008", order.order_id)
    namespace: dict[str, Any] = {}
    exec(f"async def example(engine):\n{body}\n", namespace)  # the README's own lines
    await namespace["example"](run.observer.engine)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(
        "COMPENSATED: step create_shipment (shipping) failed: shipment impossible"
    )
    assert [line.split(" ", 1)[1] for line in printed[1:] if "DeadlineReached" not in line] == [
        "order OrderPlaced",
        "inventory StockReserved reserve_stock DONE",
        "payment PaymentCharged charge_payment DONE",
        "shipping Compensate(step=charge_payment) create_shipment FAILED",
        "payment Compensate(step=reserve_stock) charge_payment COMPENSATED",
        "inventory SagaEnded(status=COMPENSATED) reserve_stock COMPENSATED",
    ]


async def test_graph_draws_the_observed_choreography_and_a_valid_asyncapi_document(
    run: Run,
) -> None:
    import jsonschema

    for scenario in (Scenario.COMPLETED, Scenario.SHIPMENT_IMPOSSIBLE):
        await settled_traces(run, run.orders[scenario].order_id)
    mermaid = saga_cli("graph", "--database-url", run.log_url, "--saga", SAGA)
    assert mermaid.returncode == 0, mermaid.stderr
    lines = mermaid.stdout.strip().splitlines()
    assert lines[0] == "flowchart LR"
    edges = {
        (m.group(1), m.group(2), m.group(3))
        for line in lines[1:]
        if (m := re.fullmatch(r'    svc_(\w+) -->\|"(\w+) x\d+, p50 \d+ ms"\| svc_(\w+)', line))
    }
    assert edges >= {
        ("order", "OrderPlaced", "inventory"),
        ("inventory", "StockReserved", "payment"),
        ("payment", "PaymentCharged", "shipping"),
        ("shipping", "ShipmentCreated", "order"),
        ("shipping", "Compensate", "payment"),
        ("payment", "Compensate", "inventory"),
    }
    # Only consumption counts: the order service writes its deadline message with the
    # first event, it does not consume OrderPlaced to do so.
    assert ("order", "OrderPlaced", "order") not in edges
    dot = saga_cli("graph", "--database-url", run.log_url, "--format", "dot")
    assert dot.stdout.startswith("digraph choreography {")
    assert '"order" -> "inventory" [label="OrderPlaced x' in dot.stdout

    result = saga_cli("graph", "--database-url", run.log_url, "--format", "asyncapi")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    schema_path = Path(__file__).parent / "asyncapi" / "asyncapi-3.0.0.schema.json"
    jsonschema.Draft7Validator(json.loads(schema_path.read_text())).validate(document)
    channel = document["channels"][re.sub(r"\W", "_", run.prefix + SAGA)]
    assert channel["address"] == run.prefix + SAGA
    placed = document["components"]["messages"]["choreosaga_shop_OrderPlaced"]
    assert placed["payload"]["schema"]["name"] == "OrderPlaced"
    assert "order_id" in {f["name"] for f in placed["payload"]["schema"]["fields"]}
    receive = document["operations"]["inventory_receives_choreosaga_shop_OrderPlaced"]
    assert receive["action"] == "receive"
    assert "order_sends_choreosaga_shop_OrderPlaced" in document["operations"]


async def test_saga_abort_compensates_a_running_saga_once_even_when_asked_twice(
    run: Run,
) -> None:
    shop = run.shop
    order = order_for(Scenario.DEADLINE_PASSED, 300)  # waits for a slow card
    await shop.order.place(order)

    async def reserved() -> bool:
        trace = await trace_from_log(run.observer.engine, order.order_id)
        return trace is not None and any(e.step == "reserve_stock" for e in trace.entries)

    async with asyncio.timeout(30):
        while not await reserved():
            await asyncio.sleep(0.1)
    bootstrap = run.kafka.bootstrap_servers
    first = saga_cli(
        "abort", order.order_id, "--reason", "customer cancelled",
        "--database-url", run.log_url, kafka=bootstrap,
    )  # fmt: skip
    again = saga_cli(
        "abort", order.order_id, "--reason", "customer cancelled twice",
        "--saga", SAGA, "--topic-prefix", run.prefix, kafka=bootstrap,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert again.returncode == 0, again.stderr
    async with asyncio.timeout(30):
        while (await shop.statuses())[order.order_id] != ("rejected", "customer cancelled"):
            await asyncio.sleep(0.1)
    (reservation,) = [
        r
        for r in await shop.inventory.rows(shop.inventory.reservations)
        if r.order_id == order.order_id
    ]
    assert reservation.status == "released"

    async def ended() -> Trace:
        while True:
            trace = await trace_from_log(run.observer.engine, order.order_id)
            if trace is not None and trace.status.is_terminal:
                return trace
            await asyncio.sleep(0.1)

    async with asyncio.timeout(30):
        trace = await ended()
    assert trace.explanation() == "COMPENSATED: aborted: customer cancelled"
    events = [(e.service, e.event) for e in trace.entries if e.event != "DeadlineReached"]
    assert events == [
        ("order", "OrderPlaced"),
        ("inventory", "StockReserved"),
        ("saga-abort", "AbortRequested"),
        ("order", "Compensate(step=reserve_stock)"),  # compensated once
        ("inventory", "SagaEnded(status=COMPENSATED)"),
    ]
    # Both requests are on the topic, under one id: the second changed nothing.
    records = await scan_kafka(run.kafka, run.codec, order.order_id, patterns=(run.prefix + "*",))
    requests = [m for m in records if m.event_type.endswith("AbortRequested")]
    assert len(requests) == 2
    assert len({m.message_id for m in requests}) == 1
    assert trace.complete
    later = saga_cli(
        "abort", order.order_id, "--reason", "x", "--database-url", run.log_url, kafka=bootstrap
    )
    assert later.returncode == 0, later.stderr
    assert "already ended COMPENSATED: nothing to abort" in later.stdout
