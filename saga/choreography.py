"""What a service does with each message of a saga it takes part in.

There is no orchestrator. Each service reads its sagas' topics, merges every
stamp into its view of the saga (``saga.state``), and acts on the message:

* a forward event for one of its steps runs the step, unless the saga is no
  longer running or its deadline has passed (a late event never resurrects
  a saga). The events the step emits carry the stamp with the step appended.
  A step that fails the saga (a business outcome) starts compensation;
* ``Compensate(step)`` for one of its steps undoes the step once, then asks
  for the next compensation, the most recent completed step first (LIFO,
  read from the stamp), or announces ``SagaEnded`` when none is left. A
  compensation that keeps failing is recorded as such; compensation goes on
  with the other steps and the saga ends ``FAILED``, visibly;
* the initiating service also owns the deadline (``DeadlineReached``, a
  scheduled message) and acts on ``AbortRequested`` (``saga abort``) the same
  way while the saga runs, and compensates steps that report in after compensation
  started; its end handler runs once per terminal status.

Everything happens inside the handler's transaction: the view, the service's
own changes, the inbox row and the outgoing messages commit together.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from outbox import OutboxMessage, RetryPolicy, is_transient_db_error
from saga.context import SagaContext, outgoing
from saga.envelope import Envelope, EnvelopeCodec
from saga.errors import ConfigurationError, HandlerError
from saga.stamp import SagaStatus, Stamp, StepOutcome, StepRecord
from saga.state import SagaStates, SagaView, merge

__all__ = [
    "COMPENSATE",
    "DEADLINE_REACHED",
    "SAGA_ENDED",
    "Choreography",
    "Participation",
    "SagaHandler",
]

log = logging.getLogger(__name__)

COMPENSATE = "choreosaga.saga.Compensate"
"""Event asking a service to undo one of its steps."""
SAGA_ENDED = "choreosaga.saga.SagaEnded"
"""Event announcing a terminal status."""
DEADLINE_REACHED = "choreosaga.saga.DeadlineReached"
"""Scheduled event that fires a saga's deadline at the initiator."""
ABORT_REQUESTED = "choreosaga.saga.AbortRequested"
"""Event asking the initiator to compensate a saga that has not ended (``saga abort``)."""
FRAMEWORK_EVENTS = frozenset({COMPENSATE, SAGA_ENDED, DEADLINE_REACHED, ABORT_REQUESTED})

SagaHandler = Callable[[SagaContext], Awaitable[None]]
"""A saga step, compensation or end handler."""


@dataclass(frozen=True)
class Registered:
    """A handler with its step name and retry policy."""

    handler: SagaHandler
    step: str | None
    retry: RetryPolicy | None


@dataclass
class Participation:
    """What one service does in one saga."""

    saga: str
    """Saga name."""
    topic: str
    """Topic carrying the saga's events."""
    steps: dict[str, Registered] = field(default_factory=dict)
    """Step handlers by the event type that triggers them."""
    compensations: dict[str, Registered] = field(default_factory=dict)
    """Compensation handlers by step name."""
    on_end: Registered | None = None
    """End handler (initiator only)."""
    initiator: bool = False
    """Whether this service starts the saga and owns its deadline."""

    def performs(self, step: str) -> bool:
        """Whether this service performs ``step``."""
        return any(r.step == step for r in self.steps.values())

    def concerns(self, envelope: Envelope) -> bool:
        """Whether a message of the saga needs any work here.

        The initiator follows every message (it owns the deadline and catches
        late steps); other services need their own steps' triggers, and the
        compensation and end messages that tell them the saga stopped running.
        """
        if self.initiator or envelope.type in (COMPENSATE, SAGA_ENDED):
            return True
        return envelope.type in self.steps

    def handler_for(self, envelope: Envelope) -> Registered | None:
        """The handler a message would run here, if any (for its retry policy)."""
        if envelope.type == COMPENSATE:
            return self.compensations.get(str(envelope.data.get("step")))
        if envelope.type == SAGA_ENDED:
            return self.on_end
        return self.steps.get(envelope.type)


def _now() -> datetime:
    return datetime.now(UTC)


class Choreography:
    """Runs one service's part of its sagas, inside the handler transaction.

    Args:
        service: Name of the service (recorded in step records).
        source: CloudEvents source of the framework events it emits.
        states: The service's saga views.
        codec: Envelope codec for outgoing messages.
    """

    def __init__(
        self, *, service: str, source: str, states: SagaStates, codec: EnvelopeCodec
    ) -> None:
        self.service = service
        self.source = source
        self.states = states
        self.codec = codec

    async def handle(
        self,
        ctx: SagaContext,
        part: Participation,
        *,
        broken: BaseException | None = None,
    ) -> list[OutboxMessage]:
        """Act on one saga message; return the outbox rows to write.

        ``broken`` is the error that made the handler give up on earlier
        attempts: instead of running it again, the step is failed (or the
        compensation recorded as failed) so that the saga still ends.
        """
        envelope = ctx.envelope
        assert envelope.stamp is not None
        before = await self.states.load(ctx.session, envelope.stamp.saga_id)
        if envelope.type == ABORT_REQUESTED and (before is None or not part.initiator):
            return []  # not this service's to abort, or a saga it never started
        view = merge(before.stamp if before else None, envelope.stamp)
        ended = before.ended if before else None
        ctx.stamp = view
        out: list[OutboxMessage] = []
        kind = envelope.type
        charged = _charged(broken, kind, part)
        if kind == COMPENSATE:
            view = await self._compensate(ctx, part, view, out, broken, charged)
        elif kind == DEADLINE_REACHED:
            if part.initiator and view.status is SagaStatus.RUNNING:
                log.info("%s: saga %s passed its deadline", self.service, view.saga_id)
                view = view.with_status(SagaStatus.COMPENSATING, "deadline passed")
                view = self._next_compensation(ctx, view, out)
        elif kind == ABORT_REQUESTED:
            if view.status is SagaStatus.RUNNING:
                reason = str(envelope.data.get("reason") or "aborted")
                log.warning("%s: saga %s aborted: %s", self.service, view.saga_id, reason)
                view = view.with_status(SagaStatus.COMPENSATING, reason)
                view = self._next_compensation(ctx, view, out)
        elif kind in part.steps:
            view = await self._step(ctx, part.steps[kind], view, out, broken, charged)
        if part.initiator and before is not None and kind not in (COMPENSATE, DEADLINE_REACHED):
            self._catch_up(ctx, before.stamp, view, out, redrive=kind == SAGA_ENDED)
        if part.on_end is not None and view.status.is_terminal and ended is not view.status:
            ended = await self._end(ctx, part.on_end, view, out, broken, charged)
        await self.states.save(ctx.session, SagaView(stamp=view, ended=ended))
        return out

    async def _run(self, role: str, registered: Registered, ctx: SagaContext) -> None:
        """Run a user handler; tag what it raises with its role in the saga."""
        try:
            await registered.handler(ctx)
        except HandlerError as exc:
            exc.role = exc.role or role
            raise
        except Exception as exc:
            retriable = is_transient_db_error(exc) or bool(getattr(exc, "retriable", False))
            raise HandlerError(
                f"{role} handler {registered.step or 'end'!s} of {self.service} raised {exc!r}",
                retriable=retriable,
                role=role,
            ) from exc

    async def _end(
        self,
        ctx: SagaContext,
        registered: Registered,
        view: Stamp,
        out: list[OutboxMessage],
        broken: BaseException | None,
        charged: str | None,
    ) -> SagaStatus:
        """Run the initiator's end handler, once per terminal status."""
        ctx.step = None
        ctx.stamp = view
        if charged != "end":
            await self._run("end", registered, ctx)
        else:
            log.error("%s: end handler of saga %s gave up: %r", self.service, view.saga_id, broken)
        out += self._messages(ctx, view)
        return view.status

    # -- forward ---------------------------------------------------------------------

    async def _step(
        self,
        ctx: SagaContext,
        registered: Registered,
        view: Stamp,
        out: list[OutboxMessage],
        broken: BaseException | None,
        charged: str | None,
    ) -> Stamp:
        name = registered.step
        assert name is not None
        if view.status is not SagaStatus.RUNNING:
            log.info(
                "%s: saga %s is %s; step %s not performed",
                self.service,
                view.saga_id,
                view.status.value,
                name,
            )
            return view
        if view.deadline is not None and _now() >= view.deadline:
            log.info(
                "%s: saga %s is past its deadline; step %s not performed",
                self.service,
                view.saga_id,
                name,
            )
            return view
        if any(s.name == name and s.outcome is not StepOutcome.COMPENSATED for s in view.steps):
            return view  # already performed (a second trigger of the same step)
        ctx.step = name
        ctx.stamp = view
        if charged != "step":
            await self._run("step", registered, ctx)
        else:
            ctx.failure = f"step {name} failed: {_cause(broken)!r}"[:500]
        immediate = [e for e in ctx.emissions if e.delay is None and e.deliver_at is None]
        if ctx.failure is not None:
            view = view.with_step(self._record(name, StepOutcome.FAILED, ctx.results))
            view = view.with_status(SagaStatus.COMPENSATING, ctx.failure)
            out += self._messages(ctx, view)
            return self._next_compensation(ctx, view, out)
        if ctx.completes:
            view = view.with_step(self._record(name, StepOutcome.DONE, ctx.results))
            view = view.with_status(SagaStatus.COMPLETED)
            out += self._messages(ctx, view)
            out += self._framework(
                ctx, view, SAGA_ENDED, {"status": view.status.value, "reason": None}
            )
            return view
        if immediate:
            view = view.with_step(self._record(name, StepOutcome.DONE, ctx.results))
        elif not ctx.emissions:
            raise HandlerError(
                f"step {name} of {self.service} neither emitted nor scheduled an event, "
                "nor completed or failed the saga: the saga would stall"
            )
        out += self._messages(ctx, view)
        return view

    def _catch_up(
        self,
        ctx: SagaContext,
        before: Stamp,
        view: Stamp,
        out: list[OutboxMessage],
        *,
        redrive: bool,
    ) -> None:
        """At the initiator: undo steps the compensation chain has not covered.

        A step that reports in after compensation began (a late event) is
        undone at once. When a chain announces its end while this view still
        holds a done step (a branch the chain never saw), compensation is
        asked for again.
        """
        if view.status is not SagaStatus.COMPENSATING:
            return
        pending = view.to_compensate()
        done_before = {s.name for s in before.steps if s.outcome is StepOutcome.DONE}
        late = (
            [s for s in pending if s.name not in done_before]
            if before.status is not SagaStatus.RUNNING
            else []
        )
        for step in late:
            log.warning(
                "%s: step %s of saga %s finished after compensation began; undoing it",
                self.service,
                step.name,
                view.saga_id,
            )
        if redrive and pending and not late:
            late = pending[:1]
        for step in late:
            out += self._framework(
                ctx, view, COMPENSATE, {"step": step.name, "reason": view.reason}
            )

    # -- backward --------------------------------------------------------------------

    async def _compensate(
        self,
        ctx: SagaContext,
        part: Participation,
        view: Stamp,
        out: list[OutboxMessage],
        broken: BaseException | None,
        charged: str | None,
    ) -> Stamp:
        name = str(ctx.envelope.data["step"])
        registered = part.compensations.get(name)
        if registered is None and not part.performs(name):
            return view  # another service's step
        outcomes = {s.outcome for s in view.steps if s.name == name}
        if outcomes & {StepOutcome.COMPENSATED, StepOutcome.COMPENSATION_FAILED}:
            pass  # already undone: compensation runs once; the chain goes on
        elif StepOutcome.DONE in outcomes:
            ctx.step = name
            ctx.stamp = view
            outcome = StepOutcome.COMPENSATED
            if registered is None:
                pass  # a step with nothing to undo
            elif charged != "compensation":
                await self._run("compensation", registered, ctx)
            else:
                outcome = StepOutcome.COMPENSATION_FAILED
                log.error(
                    "%s: compensation of %s in saga %s failed for good: %r",
                    self.service,
                    name,
                    view.saga_id,
                    broken,
                )
                ctx.emissions.clear()
                ctx.results["error"] = repr(_cause(broken))[:500]
            view = view.with_step(self._record(name, outcome, ctx.results))
            out += self._messages(ctx, view)
        return self._next_compensation(ctx, view, out)

    def _next_compensation(self, ctx: SagaContext, view: Stamp, out: list[OutboxMessage]) -> Stamp:
        todo = view.to_compensate()
        if todo:
            out += self._framework(
                ctx, view, COMPENSATE, {"step": todo[0].name, "reason": view.reason}
            )
            return view
        failed = any(s.outcome is StepOutcome.COMPENSATION_FAILED for s in view.steps)
        final = SagaStatus.FAILED if failed else SagaStatus.COMPENSATED
        if view.status is not final:
            view = view.with_status(final)
        out += self._framework(
            ctx, view, SAGA_ENDED, {"status": final.value, "reason": view.reason}
        )
        return view

    # -- messages --------------------------------------------------------------------

    def _record(self, name: str, outcome: StepOutcome, data: Mapping[str, str]) -> StepRecord:
        return StepRecord(name=name, service=self.service, outcome=outcome, at=_now(), data=data)

    def _messages(self, ctx: SagaContext, stamp: Stamp) -> list[OutboxMessage]:
        """Encode what the handler emitted so far, with ``stamp``; each only once."""
        messages = [message for _, message in ctx.envelopes(self.codec, stamp.next_hop())]
        ctx.emissions.clear()
        return messages

    def _framework(
        self, ctx: SagaContext, stamp: Stamp, event_type: str, data: Mapping[str, Any]
    ) -> list[OutboxMessage]:
        incoming = ctx.envelope
        envelope = Envelope(
            type=event_type,
            data=data,
            source=self.source,
            key=stamp.saga_id.encode(),
            correlation_id=stamp.correlation_id,
            causation_id=incoming.id,
            stamp=stamp.next_hop(),
        )
        _, message = outgoing(self.codec, envelope, topic=ctx.saga_topic)
        return [message]


def start_messages(
    codec: EnvelopeCodec,
    *,
    source: str,
    topic: str,
    stamp: Stamp,
    event_type: str,
    data: Mapping[str, Any],
) -> Sequence[OutboxMessage]:
    """The first event of a saga, and its deadline message if it has one."""
    key = stamp.saga_id.encode()
    first = Envelope(
        type=event_type,
        data=data,
        source=source,
        key=key,
        correlation_id=stamp.correlation_id,
        stamp=stamp,
    )
    messages = [outgoing(codec, first, topic=topic)[1]]
    if stamp.deadline is not None:
        deadline = Envelope(
            type=DEADLINE_REACHED,
            data={"deadline": stamp.deadline},
            source=source,
            key=key,
            correlation_id=stamp.correlation_id,
            causation_id=first.id,
            stamp=stamp,
        )
        messages.append(outgoing(codec, deadline, topic=topic, deliver_at=stamp.deadline)[1])
    return messages


def check_step_name(name: str) -> str:
    """Refuse empty or overlong step and saga names."""
    if not name or len(name) > 100 or not name.isidentifier():
        raise ConfigurationError(f"{name!r} is not a valid step or saga name (an identifier)")
    return name


def _charged(broken: BaseException | None, kind: str, part: Participation) -> str | None:
    """Which handler the error that made this message's handling give up is charged to.

    Errors raised by a handler carry its role; any other error (for example
    events a step emitted that do not fit their schema) is charged to the
    handler the message triggers.
    """
    if broken is None:
        return None
    role = getattr(broken, "role", None)
    if isinstance(role, str):
        return role
    if kind == COMPENSATE:
        return "compensation"
    return "step" if kind in part.steps else "end"


def _cause(broken: BaseException | None) -> BaseException:
    """The user's own exception behind a handler failure."""
    assert broken is not None
    return broken.__cause__ or broken
