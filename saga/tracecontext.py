"""W3C trace context in and out of Kafka headers, through OpenTelemetry.

Incoming ``traceparent``/``tracestate`` are extracted with the W3C
propagator and made the current context while the handler runs; outgoing
messages get the current context injected. Spans themselves are the business
of a tracing interceptor (``saga.telemetry``); when its span for a message
is already current and in the message's trace (or the message has no valid
context, so the span started a trace), it stays current, so that what the
handler emits is caused by that span. Without one, the trace id
still flows unchanged from message to message, so a saga's messages share
one trace id. A message emitted with no current trace starts a new trace id.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["current_trace_headers", "use_trace_headers"]

_PROPAGATOR = TraceContextTextMapPropagator()


@contextlib.contextmanager
def use_trace_headers(traceparent: str | None, tracestate: str | None) -> Iterator[None]:
    """Make the trace context of an incoming message current inside the block."""
    current = trace.get_current_span().get_span_context()
    incoming = _PROPAGATOR.extract({"traceparent": traceparent} if traceparent else {})
    parent = trace.get_current_span(incoming).get_span_context()  # trace id 0: none or invalid
    if current.is_valid and not current.is_remote and parent.trace_id in (0, current.trace_id):
        # A tracing interceptor already opened this message's span (a child of
        # the incoming context): what the handler emits is caused by that span.
        yield
        return
    carrier = {}
    if traceparent:
        carrier["traceparent"] = traceparent
        if tracestate:
            carrier["tracestate"] = tracestate
    token = otel_context.attach(_PROPAGATOR.extract(carrier))
    try:
        yield
    finally:
        otel_context.detach(token)


def current_trace_headers() -> tuple[str, str | None]:
    """Return ``(traceparent, tracestate)`` for an outgoing message.

    Uses the current OpenTelemetry context; starts a new (unsampled) trace
    when there is none, so that every message can be followed.
    """
    ctx = otel_context.get_current()
    if not trace.get_current_span(ctx).get_span_context().is_valid:
        span_context = SpanContext(
            trace_id=random.getrandbits(128) or 1,
            span_id=random.getrandbits(64) or 1,
            is_remote=False,
            trace_flags=TraceFlags(TraceFlags.DEFAULT),
        )
        ctx = trace.set_span_in_context(NonRecordingSpan(span_context), ctx)
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=ctx)
    return carrier["traceparent"], carrier.get("tracestate")
