"""OpenTelemetry spans and metrics for a service, as an interceptor around its runtime.

:func:`instrument` wraps three seams of a :class:`~saga.service.Service`
before it starts, and changes nothing else:

* the record pipeline (``service.processor.process``): one CONSUMER span
  per record, ``<topic> process``, child of the context the record carries
  (``traceparent``/``tracestate``; a malformed one is ignored and the span
  starts a new trace). The span stays current while the handler runs
  (``saga.tracecontext``), so the messages it emits carry it: a saga's
  messages across every service form one trace, compensations included.
  Around each batch (``process_batch``) the gauges are refreshed, and an
  outage that loses a batch (``batch_outage``) is counted;
* the outbox writes (``service.outbox.add``): an INTERNAL ``outbox write``
  span, child of the current one (in a batch, each record's add, inside its
  span; the rows are written when the batch commits);
* the relay's publisher: one PRODUCER span per record, ``<topic> publish``,
  linked to the context written in the row (the span that emitted it).

Spans carry the messaging semantic-convention attributes and ``saga.name``,
``saga.id``, ``saga.step`` and ``saga.status``. Only ``opentelemetry-api`` is
needed: without an SDK every call is a no-op. Metrics are described in
:mod:`saga.telemetry.metrics`.

A sampled trace needs a sampled start: start a saga inside a sampled span
(the request that placed the order). Messages emitted outside any span get a
random, unsampled trace id so that they can still be followed by id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from aiokafka import ConsumerRecord
from opentelemetry import trace
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import Link, SpanKind, Status, StatusCode, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from sqlalchemy import event as sa_event
from sqlalchemy.ext.asyncio import AsyncSession

from outbox import OutboxMessage, Publisher, PublishError, Relay, StoredMessage, Transaction
from saga.batch import CURRENT
from saga.choreography import COMPENSATE, SAGA_ENDED
from saga.envelope import Envelope, H
from saga.errors import DecodeError
from saga.processing import ServiceStats
from saga.service import Service
from saga.stamp import SagaStatus
from saga.telemetry.metrics import RelayMetrics, SagaMetrics

__all__ = ["ServiceTelemetry", "TracingPublisher", "instrument", "instrument_relay"]

log = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()
_MAX_HEADER = 512  # a larger traceparent/tracestate is not a trace context: ignore it


def _carrier(headers: Iterable[tuple[str, bytes | None]]) -> dict[str, str]:
    carrier: dict[str, str] = {}
    for name, raw in headers:
        if name in (H.TRACEPARENT, H.TRACESTATE) and raw and len(raw) <= _MAX_HEADER:
            try:
                carrier[name] = raw.decode("ascii")
            except UnicodeDecodeError:
                continue
    return carrier


def _header(headers: Iterable[tuple[str, bytes | None]], name: str) -> str | None:
    for key, raw in headers:
        if key == name and raw:
            return raw.decode("utf-8", "replace")
    return None


class ServiceTelemetry:
    """The spans and metrics of one instrumented service (see :func:`instrument`)."""

    def __init__(
        self,
        service: Service,
        *,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        self.service = service
        self.tracer = trace.get_tracer("choreosaga", tracer_provider=tracer_provider)
        self.metrics = SagaMetrics(service, meter_provider=meter_provider)
        # The saga topics the service takes part in (read, never changed).
        self._sagas = service._saga_topics
        self._refreshed = float("-inf")

    refresh_interval = 10.0
    """Seconds between two refreshes of the gauges while records flow."""

    async def _refresh_gauges(self) -> None:
        now = time.monotonic()
        if now - self._refreshed < self.refresh_interval:
            return
        self._refreshed = now
        try:
            await self.metrics.refresh()
        except Exception as exc:  # metrics must never stop the pipeline; say so
            log.warning("%s could not refresh its gauges: %s", self.service.name, exc)

    # -- consumer -----------------------------------------------------------------

    def _decode(self, record: ConsumerRecord[bytes, bytes]) -> Envelope | None:
        try:
            return self.service.envelopes.decode(record.key, record.value, record.headers)
        except DecodeError:
            return None

    def _step(self, envelope: Envelope, topic: str) -> str | None:
        part = self._sagas.get(topic)
        if part is None:
            return None
        if envelope.type == COMPENSATE:
            return str(envelope.data.get("step"))
        registered = part.steps.get(envelope.type)
        return None if registered is None else registered.step

    def wrap_process(
        self, process: Callable[[ConsumerRecord[bytes, bytes]], Awaitable[None]]
    ) -> Callable[[ConsumerRecord[bytes, bytes]], Awaitable[None]]:
        """The record pipeline inside a CONSUMER span, timed and counted."""
        service = self.service
        stats = service.stats

        async def traced(record: ConsumerRecord[bytes, bytes]) -> None:
            parent = _PROPAGATOR.extract(_carrier(record.headers))
            envelope = self._decode(record)
            attributes: dict[str, Any] = {
                "messaging.system": "kafka",
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": record.topic,
                "messaging.destination.partition.id": str(record.partition),
                "messaging.kafka.offset": record.offset,
                "messaging.consumer.group.name": service.settings.group_prefix + service.name,
            }
            step: str | None = None
            if envelope is not None:
                attributes["messaging.message.id"] = envelope.id
                attributes["cloudevents.event_type"] = envelope.type
                if envelope.key is not None:
                    attributes["messaging.kafka.message.key"] = envelope.key.decode(
                        "utf-8", "replace"
                    )
                if envelope.stamp is not None:
                    step = self._step(envelope, record.topic)
                    attributes.update(
                        {
                            "saga.name": envelope.stamp.saga_name,
                            "saga.id": envelope.stamp.saga_id,
                            "saga.status": envelope.stamp.status.value,
                        }
                    )
                    if step is not None:
                        attributes["saga.step"] = step
            before = _counted(stats)
            retried, waited = stats.retries, stats.outage_waits
            started = time.perf_counter()
            with self.tracer.start_as_current_span(
                f"{record.topic} process",
                context=parent,
                kind=SpanKind.CONSUMER,
                attributes=attributes,
            ) as span:
                try:
                    await process(record)
                except Exception as exc:
                    span.set_status(Status(StatusCode.ERROR, repr(exc)))
                    raise
                outcome = _outcome(before, _counted(stats))
                span.set_attribute("saga.outcome", outcome)
                if outcome == "dead_lettered":
                    span.set_status(Status(StatusCode.ERROR, "dead-lettered"))
            # Deltas of the service's counters: exact while partitions are
            # handled one record at a time, approximate when several partitions'
            # records overlap (a retry elsewhere may be counted here).
            step_or_type = step or (envelope.type if envelope is not None else "undecodable")
            seconds = time.perf_counter() - started
            retries, outages = stats.retries - retried, stats.outage_waits - waited

            def handled() -> None:
                self.metrics.handled(
                    step=step_or_type,
                    outcome=outcome,
                    seconds=seconds,
                    retries=retries,
                    outages=outages,
                )
                if envelope is not None and envelope.stamp is not None:
                    self._saga_ended(envelope, record.topic, outcome)

            # Inside a batch, once the record is committed: a batch whose
            # transaction is lost, or that another consumer's inbox rows
            # send back, redoes its records, and the metrics would count a
            # record (or a saga's end) once per pass. The pass that commits
            # is the one that happened; the span shows every pass.
            batch = CURRENT.get()
            if batch is None:
                handled()
                await self._refresh_gauges()  # inside a batch: once it is done
            else:
                batch.after_commit(handled)

        return traced

    def wrap_process_batch(
        self, process_batch: Callable[[Sequence[ConsumerRecord[bytes, bytes]]], Awaitable[None]]
    ) -> Callable[[Sequence[ConsumerRecord[bytes, bytes]]], Awaitable[None]]:
        """Refresh the gauges after a batch, not while it holds its connection.

        Reading them from inside the batch would take a second connection
        from the pool: with every connection held by a partition's batch,
        each would wait for another's until the pool timed out.
        """

        async def refreshed(records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
            await process_batch(records)
            await self._refresh_gauges()

        return refreshed

    def wrap_batch_outage(self, count: Callable[[], None]) -> Callable[[], None]:
        """A batch's lost transaction, counted in the outage metric too.

        Between records, where :meth:`wrap_process` sees no counter move.
        """

        def counted() -> None:
            count()
            self.metrics.outage()

        return counted

    def _saga_ended(self, envelope: Envelope, topic: str, outcome: str) -> None:
        part = self._sagas.get(topic)
        if part is None or not part.initiator or envelope.type != SAGA_ENDED:
            return
        # The initiator skips its own announcements (its view already holds
        # them, see Participation.concerns), and so no inbox row tells a
        # redelivery: they are counted when written (see _count_own_ends).
        if outcome != "processed" or envelope.source == part.source:
            return
        self._record_end(envelope)

    def _record_end(self, envelope: Envelope) -> None:
        assert envelope.stamp is not None
        status = str(envelope.data.get("status") or envelope.stamp.status.value)
        if status in {s.value for s in SagaStatus if s.is_terminal}:
            elapsed = datetime.now(UTC) - envelope.stamp.started_at
            self.metrics.saga_ended(
                saga=envelope.stamp.saga_name, status=status, seconds=elapsed.total_seconds()
            )

    # -- outbox ---------------------------------------------------------------------

    def wrap_outbox_add(
        self, add: Callable[[Transaction, Iterable[OutboxMessage]], Awaitable[None]]
    ) -> Callable[[Transaction, Iterable[OutboxMessage]], Awaitable[None]]:
        """Outbox writes inside an INTERNAL span."""

        async def traced(tx: Transaction, messages: Iterable[OutboxMessage]) -> None:
            batch = list(messages)
            if not batch:
                await add(tx, batch)  # nothing to write: no span
                return
            topics = sorted({m.topic for m in batch})
            with self.tracer.start_as_current_span(
                "outbox write",
                kind=SpanKind.INTERNAL,
                attributes={
                    "messaging.system": "kafka",
                    "messaging.batch.message_count": len(batch),
                    "messaging.destination.name": ",".join(topics),
                    "db.operation.name": "INSERT",
                },
            ):
                await add(tx, batch)
            self._count_own_ends(tx, batch)

        return traced

    def _count_own_ends(self, tx: Transaction, messages: list[OutboxMessage]) -> None:
        """Count the ends the initiator announces itself, once ``tx`` commits.

        It skips them when they come back, whether for the first time or
        again; what it wrote is counted once, and only if it committed.
        """
        ends: list[Envelope] = []
        for message in messages:
            part = self._sagas.get(message.topic)
            if part is None or not part.initiator or part.source is None:
                continue  # (with a source shared with others, ends are counted when consumed)
            if _header(message.headers, H.TYPE) != SAGA_ENDED:
                continue
            try:
                ends.append(
                    self.service.envelopes.decode(message.key, message.value, message.headers)
                )
            except DecodeError:
                continue
        if not ends:
            return

        def committed(*_: Any) -> None:
            for envelope in ends:
                self._record_end(envelope)

        if isinstance(tx, AsyncSession):
            sa_event.listen(tx.sync_session, "after_commit", committed, once=True)
        else:  # a connection of the caller's: no event after its commit
            committed()


def _counted(stats: ServiceStats) -> tuple[int, int, int]:
    """Records processed, duplicates and dead letters so far, those of the open
    batch included (the service's counters take them only once it commits)."""
    batch = CURRENT.get()
    pending = batch.pending if batch is not None else {}
    return (
        stats.processed + pending.get("processed", 0),
        stats.duplicates + pending.get("duplicates", 0),
        stats.dead_lettered + pending.get("dead_lettered", 0),
    )


def _outcome(before: tuple[int, int, int], after: tuple[int, int, int]) -> str:
    processed, duplicates, failed = (a - b for a, b in zip(after, before, strict=True))
    if failed:
        return "dead_lettered"
    if duplicates:
        return "duplicate"
    return "processed" if processed else "ignored"


class TracingPublisher(Publisher):
    """A publisher that wraps another: one PRODUCER span per record, linked to its writer.

    Args:
        inner: The publisher that does the work.
        tracer: Where spans go.
        metrics: Counts rounds and records, if given.
    """

    def __init__(
        self, inner: Publisher, tracer: trace.Tracer, metrics: SagaMetrics | RelayMetrics | None
    ) -> None:
        self.inner = inner
        self.tracer = tracer
        self.metrics = metrics

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    async def send(self, message: StoredMessage) -> Awaitable[None]:
        return await self.inner.send(message)

    async def publish(self, batch: Sequence[StoredMessage]) -> list[PublishError | None]:
        tracer = self.tracer
        spans = []
        for message in batch:
            written = trace.get_current_span(
                _PROPAGATOR.extract(_carrier(message.headers))
            ).get_span_context()
            attributes: dict[str, Any] = {
                "messaging.system": "kafka",
                "messaging.operation.type": "send",
                "messaging.operation.name": "publish",
                "messaging.destination.name": message.topic,
                "messaging.message.id": message.message_id,
            }
            event_type = _header(message.headers, H.TYPE)
            subject = _header(message.headers, H.SUBJECT)
            if event_type:
                attributes["cloudevents.event_type"] = event_type
            if subject:
                attributes["saga.id"] = subject
            if message.key is not None:
                attributes["messaging.kafka.message.key"] = message.key.decode("utf-8", "replace")
            spans.append(
                tracer.start_span(
                    f"{message.topic} publish",
                    kind=SpanKind.PRODUCER,
                    attributes=attributes,
                    links=[Link(written)] if written.is_valid else None,
                )
            )
        try:
            outcomes = await self.inner.publish(batch)
        except BaseException as exc:
            for span in spans:
                span.set_status(Status(StatusCode.ERROR, repr(exc)))
                span.end()
            raise
        for span, outcome in zip(spans, outcomes, strict=True):
            if outcome is not None:
                span.set_status(Status(StatusCode.ERROR, str(outcome)))
            span.end()
        if self.metrics is not None:
            self.metrics.published(
                batch=len(batch), published=sum(1 for o in outcomes if o is None)
            )
        return outcomes


def instrument(
    service: Service,
    *,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
) -> ServiceTelemetry:
    """Add spans and metrics to ``service`` (call before it starts).

    Without providers, the global ones are used (no-ops unless an SDK is
    configured, for example by :func:`saga.telemetry.configure_from_env`).
    """
    telemetry = ServiceTelemetry(
        service, tracer_provider=tracer_provider, meter_provider=meter_provider
    )
    processor = service.processor
    processor.process = telemetry.wrap_process(processor.process)  # type: ignore[method-assign,assignment]
    processor.process_batch = telemetry.wrap_process_batch(processor.process_batch)  # type: ignore[method-assign,assignment]
    processor.batch_outage = telemetry.wrap_batch_outage(processor.batch_outage)  # type: ignore[method-assign]
    store = service.outbox
    store.add = telemetry.wrap_outbox_add(store.add)  # type: ignore[method-assign,assignment]
    service.relay.publisher = TracingPublisher(
        service.relay.publisher, telemetry.tracer, telemetry.metrics
    )
    return telemetry


def instrument_relay(
    relay: Relay,
    *,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
) -> None:
    """Add publish spans and relay metrics to a standalone relay (``saga relay``)."""
    tracer = trace.get_tracer("choreosaga", tracer_provider=tracer_provider)
    metrics = RelayMetrics(relay.name, meter_provider=meter_provider)
    relay.publisher = TracingPublisher(relay.publisher, tracer, metrics)
