"""What a service does with each message of a saga it takes part in.

There is no orchestrator. Each service reads its sagas' topics, merges every
stamp into its view of the saga (``saga.state``), and acts on the message:

* a forward event for one of its steps runs the step, unless the saga is no
  longer running (a late event never resurrects a saga; participants do not
  judge the deadline by their own clocks, the initiator's deadline message
  does). The events the step emits carry the stamp with the step appended.
  A step that fails the saga (a business outcome: ``ctx.fail``, or an
  exception type declared with ``business_errors=``) starts compensation;
* ``Compensate(step)`` for one of its steps undoes the step once, then asks
  for the next compensation, the most recent completed step first (LIFO,
  read from the stamp), or announces ``SagaEnded`` when none is left;
* the initiating service also owns the deadline (``DeadlineReached``, a
  scheduled message) and acts on ``AbortRequested`` (``saga abort``) the same
  way while the saga runs, and compensates steps that report in after compensation
  started; its end handler runs once per terminal status.

One clock decides a deadline: the initiator's database clock. The deadline
is computed from it when the saga starts, and the outbox (which keeps due
times by the same clock) delivers ``DeadlineReached`` when it has passed.
Participants never compare the deadline with their own clocks: a step whose
trigger arrives runs while the saga is running, and a saga past its deadline
is stopped by the initiator's message, which turns it to compensating; a step
that reports in after that is undone.

Compensation order (the rule):

* steps are undone in the reverse of their order in the stamp, and a stamp
  keeps causal order: a step comes after the steps whose events led to it.
  Along one branch (a chain of steps, each triggered by the previous one's
  event) the later step is therefore undone first;
* parallel branches have no order between them. The failing step's chain
  undoes the steps its stamp holds (its own branch, most recent first) and
  announces the end; the initiator, which follows every message, then asks
  for the steps the chain never saw, most recent first by its view;
* a step that reports in after compensation began (it was running, or its
  trigger came before any sign of the compensation) is undone as soon as the
  initiator sees it: possibly after an earlier step of its own branch;
* each step is undone at most once; a step is (service, name).

So an undo handler must not rely on the undo of a step of another branch,
or of a step that may still have been running, having run before it.

Everything happens inside the handler's transaction: the view, the service's
own changes, the inbox row and the outgoing messages commit together.

A handler that fails in any other way (a bug: an unexpected exception, an
emitted event that does not fit its schema, ``CancelledError``) is never a
business outcome: once its retry policy is spent, the processor dead-letters
the message and :meth:`Choreography.suspend` records where the saga stopped.
Nothing is compensated; a fixed handler plus a replay continue the saga.

A suspension also announces itself (``SagaSuspended``) to the initiator,
which then holds the deadline: a bug must not spend the saga's time and
turn into a compensation. When the replayed message is handled, the service
announces ``SagaResumed`` and the initiator moves the deadline by as long as
the saga was suspended (a new ``DeadlineReached`` is scheduled; the old one is
recognised as superseded by its ``deadline`` value). Both times come from the
services' clocks, so clock skew between them shifts the new deadline by as
much. The initiator's later messages carry the moved deadline, and views (the
other services', the saga log's) keep the latest deadline they merge.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from outbox import OutboxMessage, RetryPolicy, classify
from saga.context import MessageContext, SagaContext, outgoing
from saga.envelope import Envelope, EnvelopeCodec
from saga.errors import BusinessFailure, ConfigurationError, HandlerError
from saga.stamp import SagaStatus, Stamp, StepOutcome, StepRecord, Suspension
from saga.state import SagaStates, SagaView, merge, settle

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
SAGA_SUSPENDED = "choreosaga.saga.SagaSuspended"
"""Event announcing that a service dead-lettered a message of the saga."""
SAGA_RESUMED = "choreosaga.saga.SagaResumed"
"""Event announcing that the dead-lettered message was replayed and handled."""
FRAMEWORK_EVENTS = frozenset(
    {COMPENSATE, SAGA_ENDED, DEADLINE_REACHED, ABORT_REQUESTED, SAGA_SUSPENDED, SAGA_RESUMED}
)

_OWN_MESSAGES_TO_ACT_ON = frozenset(
    {COMPENSATE, DEADLINE_REACHED, ABORT_REQUESTED, SAGA_SUSPENDED, SAGA_RESUMED}
)
"""Framework messages a service acts on even when it sent them itself.

(``SagaSuspended`` and ``SagaResumed`` from itself change nothing either, but
they are rare and the initiator's bookkeeping of them is kept in one place.)
"""

SagaHandler = Callable[[SagaContext], Awaitable[None]]
"""A saga step, compensation or end handler."""


@dataclass(frozen=True)
class Registered:
    """A handler with its step name, retry policy and business errors."""

    handler: SagaHandler
    step: str | None
    retry: RetryPolicy | None
    business_errors: tuple[type[Exception], ...] = ()


async def invoke(
    handler: Callable[[Any], Awaitable[None]],
    ctx: MessageContext,
    *,
    role: str,
    what: str,
    business_errors: tuple[type[Exception], ...] = (),
) -> None:
    """Run a user handler; turn what it raises into the error model's terms.

    A declared business error (or :class:`BusinessFailure`) raised by a step
    becomes a :class:`BusinessFailure`; anything else becomes a
    :class:`HandlerError` of the kind its cause has (a lost connection stays
    an outage, a ``KeyError`` is a bug). ``CancelledError`` raised by the
    handler itself is a bug too: only a cancellation of the running task
    (a stop, a rebalance) propagates as such.
    """
    try:
        await handler(ctx)
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        raise HandlerError(f"{what} raised CancelledError", role=role) from exc
    except BusinessFailure as exc:
        if role != "step":
            raise HandlerError(
                f"{what} raised a business failure, which only a step may: {exc}", role=role
            ) from exc
        raise
    except HandlerError as exc:
        exc.role = exc.role or role
        raise
    except Exception as exc:
        if role == "step" and business_errors and isinstance(exc, business_errors):
            raise BusinessFailure(f"{type(exc).__name__}: {exc}") from exc
        raise HandlerError(
            f"{what} raised {type(exc).__name__}", kind=classify(exc), role=role
        ) from exc


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
    source: str | None = None
    """CloudEvents source that only this service's messages carry (to recognise its
    own messages); ``None`` when the service's source may be shared by others."""

    def performs(self, step: str) -> bool:
        """Whether this service performs ``step``."""
        return any(r.step == step for r in self.steps.values())

    def concerns(self, envelope: Envelope) -> bool:
        """Whether a message of the saga needs any work here.

        The initiator follows every message (it owns the deadline and catches
        late steps); other services need their own steps' triggers, and the
        compensation and end messages that tell them the saga stopped running.

        A service's own events and end announcements come back to it on the
        saga topic, and need nothing: the transaction that emitted one saved
        the view with the very stamp it carries (merging it again changes
        nothing) and ran the end handler if the saga ended. Skipping them
        spares the initiator two of its transactions per saga. Its own
        messages that ask for work still count: ``DeadlineReached`` (sent to
        itself, for later), ``Compensate`` (possibly for its own step), and a
        step's trigger. A message is this service's own only by a source no
        other service uses (``source``): with a shared one, skipping would
        also skip the other services' steps and ends, and the initiator's view
        would never move.
        """
        if envelope.type in self.steps:
            return True
        if (
            self.source is not None
            and envelope.source == self.source
            and envelope.type not in _OWN_MESSAGES_TO_ACT_ON
        ):
            return False
        return self.initiator or envelope.type in (COMPENSATE, SAGA_ENDED)

    def role_of(self, envelope: Envelope) -> tuple[str, str | None]:
        """Which handler a message runs here (role, step), for suspensions."""
        if envelope.type == COMPENSATE:
            return "compensation", str(envelope.data.get("step"))
        if envelope.type == SAGA_ENDED:
            return "end", None
        if envelope.type in (DEADLINE_REACHED, SAGA_SUSPENDED, SAGA_RESUMED, ABORT_REQUESTED):
            return "initiator", None
        registered = self.steps.get(envelope.type)
        return "step", None if registered is None else registered.step

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
        business: BusinessFailure | None = None,
    ) -> list[OutboxMessage]:
        """Act on one saga message; return the outbox rows to write.

        ``business`` is the business failure an earlier attempt of this
        message's step raised: the step is then recorded as failed (without
        running it again) and compensation starts.
        """
        envelope = ctx.envelope
        assert envelope.stamp is not None
        incoming = envelope.stamp
        before = await self.states.load(ctx.session, incoming.saga_name, incoming.saga_id)
        if envelope.type == ABORT_REQUESTED and (before is None or not part.initiator):
            return []  # not this service's to abort, or a saga it never started
        if envelope.type == DEADLINE_REACHED and before is None:
            # A deadline fires when it is due, however long ago its saga ended:
            # with no view here (purged after the saga ended, or a saga this
            # service never took part in) its start stamp would otherwise
            # become a new running view, compensated by the initiator or left
            # running forever elsewhere.
            return []
        if envelope.type == DEADLINE_REACHED:
            # Its stamp carries the deadline it was scheduled for: perhaps one a
            # resume moved since, perhaps an earlier saga's of the same id. Only
            # the view's deadline tells whether it is due (see _deadline).
            incoming = replace(incoming, deadline=None)
        view = merge(before.stamp if before else None, incoming)
        ended = before.ended if before else None
        ctx.stamp = view
        out: list[OutboxMessage] = []
        kind = envelope.type
        if kind == COMPENSATE:
            view = await self._compensate(ctx, part, view, out)
        elif kind == DEADLINE_REACHED:
            if part.initiator and view.status is SagaStatus.RUNNING:
                view = self._deadline(ctx, view, out)
        elif kind == SAGA_SUSPENDED:
            if part.initiator and view.suspension is None:
                elsewhere = Suspension.from_avro(envelope.data)
                log.warning(
                    "%s: saga %s is suspended at %s (%s): its deadline is held",
                    self.service,
                    view.saga_id,
                    elsewhere.service,
                    elsewhere.error,
                )
                view = replace(view, suspension=elsewhere, version=view.version + 1)
        elif kind == SAGA_RESUMED:
            waiting = view.suspension
            resumed = envelope.data["message_id"]
            if part.initiator and waiting is not None and waiting.message_id == resumed:
                view = self._resume(ctx, view, waiting, envelope.data["at"], out)
        elif kind == ABORT_REQUESTED:
            if view.status is SagaStatus.RUNNING:
                reason = str(envelope.data.get("reason") or "aborted")
                log.warning("%s: saga %s aborted: %s", self.service, view.saga_id, reason)
                view = view.with_status(SagaStatus.COMPENSATING, reason)
                view = self._next_compensation(ctx, view, out)
        elif kind in part.steps:
            view = await self._step(ctx, part.steps[kind], view, out, business)
        if part.initiator and before is not None and kind not in (COMPENSATE, DEADLINE_REACHED):
            self._catch_up(ctx, before.stamp, view, out, redrive=kind == SAGA_ENDED)
        if part.on_end is not None and view.status.is_terminal and ended is not view.status:
            ended = await self._end(ctx, part.on_end, view, out)
        own = view.suspension
        if own is not None and own.message_id == envelope.id and own.service == self.service:
            log.info(
                "%s: saga %s resumes: %s was handled after its replay",
                self.service,
                view.saga_id,
                envelope.id,
            )
            now = _now()
            if part.initiator:
                view = self._resume(ctx, view, own, now, out)
            else:
                view = replace(view, suspension=None, version=view.version + 1)
            out += self._framework(
                ctx,
                view,
                SAGA_RESUMED,
                {"service": self.service, "message_id": envelope.id, "at": now},
            )
        await self.states.save(ctx.session, SagaView(stamp=view, ended=ended))
        return out

    def _deadline(self, ctx: SagaContext, view: Stamp, out: list[OutboxMessage]) -> Stamp:
        """At the initiator: the saga's deadline message arrived; compensate, unless held."""
        due = ctx.envelope.data.get("deadline")
        if view.deadline is None or (due is not None and due != view.deadline):
            # Superseded (the deadline moved while the saga was suspended), or
            # an earlier saga's of the same id: this saga has no deadline.
            return view
        if view.suspension is not None:
            log.warning(
                "%s: saga %s passed its deadline while suspended at %s: held until it resumes",
                self.service,
                view.saga_id,
                view.suspension.service,
            )
            return view
        log.info("%s: saga %s passed its deadline", self.service, view.saga_id)
        view = view.with_status(SagaStatus.COMPENSATING, "deadline passed")
        return self._next_compensation(ctx, view, out)

    def _resume(
        self,
        ctx: SagaContext,
        view: Stamp,
        held: Suspension,
        at: datetime,
        out: list[OutboxMessage],
    ) -> Stamp:
        """At the initiator: the saga resumes; move its deadline by the time it was held.

        A bug must not spend the saga's time: the deadline moves by as long as
        the saga was suspended, and a new deadline message is scheduled (the
        old one, when it comes, is recognised as superseded).
        """
        view = replace(view, suspension=None, version=view.version + 1)
        if view.deadline is None or view.status is not SagaStatus.RUNNING:
            return view
        paused = max(at - held.at, timedelta(0))
        deadline = view.deadline + paused
        log.info(
            "%s: saga %s resumed after %.1fs suspended; deadline moved to %s",
            self.service,
            view.saga_id,
            paused.total_seconds(),
            deadline.isoformat(),
        )
        view = replace(view, deadline=deadline)
        message = Envelope(
            type=DEADLINE_REACHED,
            data={"deadline": view.deadline},
            source=self.source,
            key=view.saga_id.encode(),
            correlation_id=view.correlation_id,
            causation_id=ctx.envelope.id,
            stamp=view,
        )
        out.append(outgoing(self.codec, message, topic=ctx.saga_topic, deliver_at=view.deadline)[1])
        return view

    async def suspend(self, ctx: SagaContext, suspension: Suspension) -> list[OutboxMessage]:
        """Record that the saga stopped at a dead-lettered message (in ``ctx``'s transaction).

        The saga is not compensated: it waits until the message is replayed.
        The message's stamp is not merged into the view: the replay merges it
        when it is really handled, and the initiator's catch-up must still
        see then which steps are new. Returns the ``SagaSuspended`` event that
        tells the initiator to hold the deadline.
        """
        envelope = ctx.envelope
        assert envelope.stamp is not None
        incoming = envelope.stamp
        before = await self.states.load(ctx.session, incoming.saga_name, incoming.saga_id)
        if before is None:
            view, ended = settle(replace(envelope.stamp, suspension=None)), None
        else:
            view, ended = before.stamp, before.ended
        if view.suspension is not None:
            # The saga stays suspended where it first stopped; that message's
            # replay is the one that resumes it (a later one's only adds its effect).
            return []
        view = replace(view, suspension=suspension, version=view.version + 1)
        await self.states.save(ctx.session, SagaView(stamp=view, ended=ended))
        return self._framework(ctx, view, SAGA_SUSPENDED, suspension.to_avro())

    async def _run(self, role: str, registered: Registered, ctx: SagaContext) -> None:
        """Run a user handler in the error model's terms (see :func:`invoke`)."""
        await invoke(
            registered.handler,
            ctx,
            role=role,
            what=f"{role} handler {registered.step or 'end'} of {self.service}",
            business_errors=registered.business_errors,
        )

    async def _end(
        self,
        ctx: SagaContext,
        registered: Registered,
        view: Stamp,
        out: list[OutboxMessage],
    ) -> SagaStatus:
        """Run the initiator's end handler, once per terminal status."""
        ctx.step = None
        ctx.stamp = view
        await self._run("end", registered, ctx)
        out += self._messages(ctx, view)
        return view.status

    # -- forward ---------------------------------------------------------------------

    async def _step(
        self,
        ctx: SagaContext,
        registered: Registered,
        view: Stamp,
        out: list[OutboxMessage],
        business: BusinessFailure | None,
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
        # No deadline check by this service's own clock: the initiator owns the
        # deadline (its scheduled DeadlineReached, held while the saga is
        # suspended); a step done after it fired is undone as a late step.
        mine = (self.service, name)
        if any(s.key == mine and s.outcome is not StepOutcome.COMPENSATED for s in view.steps):
            return view  # already performed here (a second trigger of the same step)
        ctx.step = name
        ctx.stamp = view
        if business is None:
            await self._run("step", registered, ctx)
        else:
            ctx.failure = f"step {name} failed: {business}"[:500]
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
        done_before = {s.key for s in before.steps if s.outcome is StepOutcome.DONE}
        late = (
            [s for s in pending if s.key not in done_before]
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
            out += self._framework(ctx, view, COMPENSATE, _compensate_data(step, view))

    # -- backward --------------------------------------------------------------------

    async def _compensate(
        self,
        ctx: SagaContext,
        part: Participation,
        view: Stamp,
        out: list[OutboxMessage],
    ) -> Stamp:
        name = str(ctx.envelope.data["step"])
        # A step is (service, name). Requests from before Compensate v2 name
        # the step only: its owner is then whoever the view says performed it.
        owner = ctx.envelope.data.get("service") or _performer(view, name)
        if owner is not None and owner != self.service:
            return view  # another service's step, maybe of the same name
        registered = part.compensations.get(name)
        if registered is None and not part.performs(name):
            return view  # not a step of ours
        mine = (self.service, name)
        outcomes = {s.outcome for s in view.steps if s.key == mine}
        if outcomes & {StepOutcome.COMPENSATED, StepOutcome.COMPENSATION_FAILED}:
            pass  # already undone: compensation runs once; the chain goes on
        elif StepOutcome.DONE in outcomes:
            ctx.step = name
            ctx.stamp = view
            if registered is not None:  # else a step with nothing to undo
                await self._run("compensation", registered, ctx)
            view = view.with_step(self._record(name, StepOutcome.COMPENSATED, ctx.results))
            out += self._messages(ctx, view)
        return self._next_compensation(ctx, view, out)

    def _next_compensation(self, ctx: SagaContext, view: Stamp, out: list[OutboxMessage]) -> Stamp:
        todo = view.to_compensate()
        if todo:
            out += self._framework(ctx, view, COMPENSATE, _compensate_data(todo[0], view))
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


def _compensate_data(step: StepRecord, view: Stamp) -> dict[str, Any]:
    """The ``Compensate`` request for ``step``: its name and the service that owns it."""
    return {"step": step.name, "service": step.service, "reason": view.reason}


def _performer(view: Stamp, name: str) -> str | None:
    """The service that last did step ``name``, by the view (for unscoped requests)."""
    record = view.step(name)
    return None if record is None else record.service


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
