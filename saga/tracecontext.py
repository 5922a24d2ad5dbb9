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

Incoming headers are untrusted: :func:`valid_trace_headers` keeps them only
when they follow the W3C grammar (a malformed ``traceparent`` drops both, a
malformed ``tracestate`` drops itself), so a bad trace header costs the
message its trace context, never its processing.
"""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Iterator

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["current_trace_headers", "use_trace_headers", "valid_trace_headers"]

_PROPAGATOR = TraceContextTextMapPropagator()

# W3C Trace Context level 1: version, trace-id, parent-id, flags; a future
# version may append fields after a dash. Version ff is invalid.
_TRACEPARENT = re.compile(
    r"(?!ff)([0-9a-f]{2})-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}(-.*)?",
    re.ASCII | re.DOTALL,
)
_TRACESTATE_KEY = (
    r"(?:[a-z][_0-9a-z*/-]{0,255}|[a-z0-9][_0-9a-z*/-]{0,240}@[a-z][_0-9a-z*/-]{0,13})"
)
_TRACESTATE_VALUE = r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
_TRACESTATE_MEMBER = re.compile(f"{_TRACESTATE_KEY}={_TRACESTATE_VALUE}", re.ASCII)
_MAX_TRACESTATE_MEMBERS = 32


def valid_trace_headers(
    traceparent: bytes | None, tracestate: bytes | None, *, max_bytes: int = 1024
) -> tuple[str | None, str | None]:
    """Return ``(traceparent, tracestate)`` if valid W3C, else ``None`` for each.

    A malformed ``traceparent`` (not ASCII, wrong shape, an all-zero id,
    version ``ff``, over ``max_bytes``) drops both; a malformed or oversized
    ``tracestate`` drops itself. Nothing is raised: a message with a bad trace
    header is still a good message.
    """
    parent = _ascii(traceparent, max_bytes)
    if parent is None or _TRACEPARENT.fullmatch(parent) is None:
        return None, None
    if parent.startswith("00") and len(parent) != 55:
        return None, None  # version 00 has exactly four fields
    state = _ascii(tracestate, max_bytes)
    if state is not None and not _valid_tracestate(state):
        state = None
    return parent, state


def _ascii(value: bytes | None, max_bytes: int) -> str | None:
    if not value or len(value) > max_bytes or not value.isascii():
        return None
    return value.decode("ascii")


def _valid_tracestate(text: str) -> bool:
    members = [m.strip(" \t") for m in text.split(",")]
    members = [m for m in members if m]
    if not members or len(members) > _MAX_TRACESTATE_MEMBERS:
        return False
    if len({m.split("=", 1)[0] for m in members}) != len(members):
        return False  # duplicate keys
    return all(_TRACESTATE_MEMBER.fullmatch(m) for m in members)


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
