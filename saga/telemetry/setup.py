"""Export spans and metrics by OTLP when the environment asks for it."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

__all__ = ["configure_from_env"]

log = logging.getLogger(__name__)

_ENDPOINTS = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
)


def configure_from_env(service_name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Install SDK tracer and meter providers exporting by OTLP/HTTP, if configured.

    Does nothing (and returns ``False``) unless an ``OTEL_EXPORTER_OTLP_*``
    endpoint is set; the exporter reads the other standard variables itself.
    ``OTEL_TRACES_EXPORTER=none`` or ``OTEL_METRICS_EXPORTER=none`` turn one
    signal off (Jaeger, for one, takes no metrics).

    Raises:
        ImportError: An endpoint is set but the ``otel`` extra is not installed.
    """
    env = os.environ if environ is None else environ
    if not any(env.get(name) for name in _ENDPOINTS):
        return False
    try:
        from opentelemetry import metrics, trace
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise ImportError(
            "OTEL_EXPORTER_OTLP_* is set but the OpenTelemetry SDK is missing: "
            "pip install 'choreosaga[otel]'"
        ) from exc
    if env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf") not in ("http/protobuf", ""):
        raise ImportError(
            "only OTLP over HTTP is set up here: set OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf "
            "(port 4318 on most collectors)"
        )
    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or service_name})
    if env.get("OTEL_TRACES_EXPORTER", "otlp") != "none":
        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(tracer_provider)
    if env.get("OTEL_METRICS_EXPORTER", "otlp") != "none":
        reader = PeriodicExportingMetricReader(OTLPMetricExporter())
        metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[reader]))
    log.info("exporting telemetry by OTLP as %s", service_name)
    return True
