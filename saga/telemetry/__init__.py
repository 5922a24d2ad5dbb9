"""OpenTelemetry for choreosaga, as an interceptor: spans and metrics.

``instrument(service)`` before ``service.start()`` adds spans (consumer,
outbox write, relay publish) and metrics to a service; see
:mod:`saga.telemetry.tracing` and :mod:`saga.telemetry.metrics`. The library
needs only ``opentelemetry-api``; ``configure_from_env()`` sets up the SDK
and the OTLP exporter (``pip install 'choreosaga[otel]'``) when the standard
``OTEL_EXPORTER_OTLP_*`` variables are set.
"""

from saga.telemetry.metrics import SagaMetrics
from saga.telemetry.setup import configure_from_env
from saga.telemetry.tracing import ServiceTelemetry, instrument

__all__ = ["SagaMetrics", "ServiceTelemetry", "configure_from_env", "instrument"]
