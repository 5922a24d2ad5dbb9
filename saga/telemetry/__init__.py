"""OpenTelemetry for choreosaga, as an interceptor: spans and metrics.

``instrument(service)`` before ``service.start()`` adds spans (consumer,
outbox write, relay publish) and metrics to a service, ``instrument_relay``
publish spans to a standalone relay; see
:mod:`saga.telemetry.tracing` and :mod:`saga.telemetry.metrics`. The library
needs only ``opentelemetry-api``; ``configure_from_env()`` sets up the SDK
and the OTLP exporter (``pip install 'choreosaga[otel]'``) when the standard
``OTEL_EXPORTER_OTLP_*`` variables are set.
"""

from saga.telemetry.metrics import RelayMetrics, SagaMetrics
from saga.telemetry.setup import configure_from_env
from saga.telemetry.tracing import ServiceTelemetry, instrument, instrument_relay

__all__ = [
    "RelayMetrics",
    "SagaMetrics",
    "ServiceTelemetry",
    "configure_from_env",
    "instrument",
    "instrument_relay",
]
