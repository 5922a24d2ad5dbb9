"""Telemetry outside a service: OTLP export from the environment, a standalone relay."""

from __future__ import annotations

import asyncio
import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import ClassVar

import pytest
from conftest import NewTopicFactory
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from outbox import KafkaPublisher, OutboxMessage, OutboxTables, Relay, SqlOutboxStore
from saga import KafkaSettings, RelaySettings, configure_from_env, create_engine
from saga.telemetry import instrument_relay
from saga.tracecontext import current_trace_headers

SCRIPT = """
from opentelemetry import metrics, trace
from saga import configure_from_env

assert configure_from_env("choreosaga-test")
with trace.get_tracer("t").start_as_current_span("place order-1"):
    pass
metrics.get_meter("t").create_counter("orders").add(1)
trace.get_tracer_provider().shutdown()
metrics.get_meter_provider().shutdown()
"""


class Receiver(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[str]:
    server = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Receiver.received = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()
    server.server_close()


def test_nothing_is_configured_without_an_endpoint() -> None:
    assert configure_from_env("choreosaga-test", {"OTEL_SERVICE_NAME": "x"}) is False


def test_spans_and_metrics_are_exported_to_the_otlp_endpoint(collector: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": collector, "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    paths = {path for path, _ in Receiver.received}
    assert paths == {"/v1/traces", "/v1/metrics"}
    traces = b"".join(body for path, body in Receiver.received if path == "/v1/traces")
    assert b"place order-1" in traces
    assert b"choreosaga-test" in traces  # the service name, as a resource attribute


async def test_a_standalone_relay_publishes_in_spans_linked_to_the_writer(
    sqlite_url: str, kafka_settings: KafkaSettings, new_topic: NewTopicFactory
) -> None:
    topic = await new_topic(1)
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    engine = create_engine(sqlite_url)
    tables = OutboxTables()
    await tables.create_all(engine)
    store = SqlOutboxStore(engine, tables)
    with provider.get_tracer("test").start_as_current_span("handler") as writer:
        traceparent, _ = current_trace_headers()
        async with engine.begin() as conn:
            await store.add(
                conn,
                [
                    OutboxMessage(
                        topic=topic,
                        key=b"k",
                        value=b"v",
                        headers=[("traceparent", traceparent.encode())],
                    )
                    for _ in range(3)
                ],
            )
    relay = Relay(
        store,
        KafkaPublisher(kafka_settings),
        RelaySettings(poll_interval=timedelta(milliseconds=100)),
    )
    instrument_relay(
        relay, tracer_provider=provider, meter_provider=MeterProvider(metric_readers=[reader])
    )
    async with relay:
        async with asyncio.timeout(20):
            while relay.stats.published < 3:
                await asyncio.sleep(0.05)
    await engine.dispose()
    published = [s for s in spans.get_finished_spans() if s.name == f"{topic} publish"]
    assert len(published) == 3
    for span in published:
        assert span.kind is SpanKind.PRODUCER
        (link,) = span.links
        assert link.context.span_id == writer.get_span_context().span_id
        assert (span.attributes or {})["messaging.destination.name"] == topic
    (metric,) = [
        m
        for r in reader.get_metrics_data().resource_metrics
        for s in r.scope_metrics
        for m in s.metrics
        if m.name == "outbox.relay.published"
    ]
    assert sum(p.value for p in metric.data.data_points) == 3
