"""With OTEL_EXPORTER_OTLP_ENDPOINT set, spans and metrics leave the process by OTLP/HTTP."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import ClassVar

import pytest

from saga import configure_from_env

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
