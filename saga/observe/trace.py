"""A saga's timeline rebuilt after the fact, and why it ended where it did.

:func:`build_trace` takes the observed messages of one saga (from the saga
log or from a scan of the topics: the same :class:`ObservedMessage` either
way) and returns a :class:`Trace`: every message in time order with its
delta from the start, the merged final stamp, the failing step and reason,
where a saga that is not finished waits and for how long, and the messages
that must exist but were not seen (hop gaps and unknown causes, see
:mod:`saga.stamp`). :func:`trace_from_stamp` is the poorer fallback when only
a service's own saga view is at hand: the steps it knows, no messages.

A saga is (name, id): ``place_order`` and ``cancel_order`` of order 7 may
both use the id ``order-7``. :func:`messages_of` picks the messages of the
saga a reference names, and refuses an id that sagas of several names have
unless the name is given (:class:`SeveralSagasError`).

Rendering is in :mod:`saga.observe.render`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from saga.choreography import ABORT_REQUESTED, DEADLINE_REACHED, SAGA_RESUMED
from saga.errors import ConfigurationError
from saga.observe.message import ObservedMessage, deadline_counted, stamp_from_json
from saga.stamp import SagaStatus, Stamp, StepOutcome, Suspension
from saga.state import merge

__all__ = [
    "SeveralSagasError",
    "Trace",
    "TraceEntry",
    "Waiting",
    "build_trace",
    "messages_of",
    "trace_from_stamp",
]


class SeveralSagasError(ConfigurationError):
    """Sagas of several names have the id asked for, and no saga name was given."""

    def __init__(self, saga_id: str, names: Iterable[str], *, ask: str = "name the saga") -> None:
        self.saga_id = saga_id
        """The id asked for."""
        self.names = tuple(sorted(set(names)))
        """Names of the sagas that have it."""
        super().__init__(
            f"sagas of several names have id {saga_id!r} ({', '.join(self.names)}): {ask}"
        )


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


_BACKWARD = frozenset(
    status.value for status in (SagaStatus.COMPENSATING, SagaStatus.COMPENSATED, SagaStatus.FAILED)
)
"""Statuses of a saga turned back (the messages of its backward path carry them)."""


@dataclass(frozen=True, kw_only=True)
class TraceEntry:
    """One line of a timeline."""

    time: datetime
    """When it happened (message time, or step time for a stamp-only trace)."""
    delta_ms: int
    """Milliseconds since the saga started."""
    service: str
    """Service that emitted the message (or recorded the step)."""
    event_type: str | None
    """Full event type; ``None`` in a stamp-only trace."""
    step: str | None
    """Step reported with it."""
    outcome: str | None
    """Outcome of that step."""
    status: str
    """Saga status carried by the message."""
    compensation: bool
    """Whether it belongs to the backward (compensating) path."""
    hop: int | None = None
    """Hop of the message."""
    detail: str | None = None
    """What a framework event asks or announces."""
    message_id: str | None = None
    """Message id."""
    causation_id: str | None = None
    """Id of the message that caused it."""
    trace_id: str | None = None
    """W3C trace id."""

    @property
    def event(self) -> str:
        """Short label: the event's simple name and its detail."""
        if self.event_type is None:
            return f"({self.detail})" if self.detail else "(step recorded)"
        name = self.event_type.rsplit(".", 1)[-1]
        return f"{name}({self.detail})" if self.detail else name

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "time": _iso(self.time),
            "delta_ms": self.delta_ms,
            "hop": self.hop,
            "service": self.service,
            "event_type": self.event_type,
            "event": self.event,
            "step": self.step,
            "outcome": self.outcome,
            "status": self.status,
            "compensation": self.compensation,
            "detail": self.detail,
            "message_id": self.message_id,
            "causation_id": self.causation_id,
            "trace_id": self.trace_id,
        }


@dataclass(frozen=True, kw_only=True)
class Waiting:
    """Where a saga that has not ended stands."""

    since: datetime
    """Time of its last message."""
    idle_seconds: float
    """Seconds from that message to when the trace was built."""
    after: str
    """The last message: ``<event> from <service>``."""
    deadline: datetime | None
    """The saga's deadline, if it has one."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "since": _iso(self.since),
            "idle_seconds": round(self.idle_seconds, 3),
            "after": self.after,
            "deadline": None if self.deadline is None else _iso(self.deadline),
        }


@dataclass(frozen=True, kw_only=True)
class Trace:
    """One saga's story."""

    saga_name: str
    """Saga type."""
    saga_id: str
    """Saga instance id."""
    correlation_id: str
    """Correlation id of its messages."""
    started_at: datetime
    """When it started."""
    stamp: Stamp
    """Merge of every stamp seen: the saga's final known state."""
    entries: tuple[TraceEntry, ...]
    """The timeline, in time order."""
    missing_hops: tuple[int, ...] | None
    """Hops with no message (``None``: unknown, a stamp-only trace)."""
    missing_causes: tuple[str, ...] = ()
    """Message ids that caused a seen message but were not seen themselves."""
    waiting: Waiting | None = None
    """Where it waits, if it has not ended."""
    source: str = "saga log"
    """Where the trace was read from (not part of its JSON)."""
    topic: str | None = None
    """Topic of the saga's messages (``None`` in a stamp-only trace)."""

    @property
    def status(self) -> SagaStatus:
        """Final known status."""
        return self.stamp.status

    @property
    def failed_step(self) -> tuple[str, str] | None:
        """``(step, service)`` of the step that failed the saga, if one did."""
        for step in self.stamp.steps:
            if step.outcome is StepOutcome.FAILED:
                return step.name, step.service
        return None

    @property
    def aborted(self) -> bool:
        """Whether an abort request (``saga abort``) turned the saga back.

        Known from the timeline only: the initiator, which alone acts on an
        abort and decides to compensate, sent its first message of the backward
        path (compensating, compensated or failed) because of an
        ``AbortRequested``. A request that came once it had turned the saga back
        (its deadline passed, a step failed) does not count, whatever it caused
        then; a stamp-only trace cannot tell. Only the initiator's own messages
        are compared, in the order of its own clock: a participant's answer may
        bear an earlier time (its clock behind) or a lower hop (another branch)
        than the initiator's decision, and a step that completed the saga while
        the abort was on its way is no part of the backward path.
        """
        requests = {
            e.message_id for e in self.entries if e.event_type == ABORT_REQUESTED and e.message_id
        }
        backward = [
            e for e in self.entries if e.status in _BACKWARD and e.event_type != ABORT_REQUESTED
        ]
        acted = next((e for e in backward if e.causation_id in requests), None)
        if acted is None:
            return False
        first = next(e for e in backward if e.service == acted.service)
        return first.causation_id in requests

    @property
    def complete(self) -> bool:
        """Whether no message is known to be missing."""
        return not self.missing_hops and not self.missing_causes

    def explanation(self) -> str:
        """One sentence: the final status and why."""
        stamp = self.stamp
        status = stamp.status
        if status is SagaStatus.COMPLETED:
            return "COMPLETED: every step done"
        failed = self.failed_step
        if self.aborted:
            # The reason is what saga abort was given ("customer cancelled"); a
            # step that failed afterwards did not turn the saga back, the abort did.
            cause = "aborted"
        elif failed:
            cause = f"step {failed[0]} ({failed[1]}) failed"
        else:
            cause = "compensation began"
        why = f"{cause}: {stamp.reason}" if stamp.reason else cause
        undone = [s.name for s in stamp.steps if s.outcome is StepOutcome.COMPENSATION_FAILED]
        if status is SagaStatus.FAILED:
            return f"FAILED: {why}; compensation failed for {', '.join(undone) or 'a step'}"
        if status is SagaStatus.COMPENSATED:
            return f"COMPENSATED: {why}"
        text = f"{status.value}: {why}" if status is SagaStatus.COMPENSATING else status.value
        held = stamp.suspension
        if held is not None:
            text += f", suspended at {_where(held)}: {held.error}"
        if self.waiting is not None:
            text += (
                f"; waiting {self.waiting.idle_seconds:.1f}s since {self.waiting.after}"
                f" at {_iso(self.waiting.since)}"
            )
            if self.waiting.deadline is not None:
                text += f" (deadline {_iso(self.waiting.deadline)})"
        return text

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the same from the saga log and from Kafka)."""
        failed = self.failed_step
        return {
            "saga_name": self.saga_name,
            "saga_id": self.saga_id,
            "correlation_id": self.correlation_id,
            "started_at": _iso(self.started_at),
            "status": self.status.value,
            "terminal": self.status.is_terminal,
            "reason": self.stamp.reason,
            "failed_step": None if failed is None else {"step": failed[0], "service": failed[1]},
            "explanation": self.explanation(),
            "suspension": None if self.stamp.suspension is None else _suspension(self.stamp),
            "waiting": None if self.waiting is None else self.waiting.to_dict(),
            "missing_hops": None if self.missing_hops is None else list(self.missing_hops),
            "missing_causes": list(self.missing_causes),
            "steps": [
                {"step": s.name, "service": s.service, "outcome": s.outcome.value, "at": _iso(s.at)}
                for s in self.stamp.steps
            ],
            "timeline": [entry.to_dict() for entry in self.entries],
        }


_VIEW_WRITE = timedelta(seconds=1)
"""How much later than its latest recorded time a saga view may be written."""


def _delta_ms(start: datetime, moment: datetime) -> int:
    """Milliseconds from the saga's start to ``moment``."""
    return round((moment - start).total_seconds() * 1000)


def _where(held: Suspension) -> str:
    return " ".join(part for part in (held.service, held.role, held.step) if part)


def _suspension(stamp: Stamp) -> dict[str, Any]:
    held = stamp.suspension
    assert held is not None
    return {
        "service": held.service,
        "role": held.role,
        "step": held.step,
        "error": held.error,
        "at": _iso(held.at),
        "message_id": held.message_id,
        "dead_letter_topic": held.dead_letter_topic,
    }


def messages_of(
    messages: Iterable[ObservedMessage], ref: str, *, saga: str | None = None
) -> list[ObservedMessage]:
    """The messages of the saga that ``ref`` (a saga id or a correlation id) names.

    With ``saga``, only that saga's messages. Without it, ``ref`` may be the
    id of one saga only, whatever its name. When no saga has the id ``ref``,
    it is a correlation id, and every saga that shares it is left in
    (:func:`build_trace` traces the earliest).

    Raises:
        SeveralSagasError: ``saga`` is left out and sagas of several names
            have the id ``ref``.
    """
    found = [m for m in messages if saga is None or m.saga_name == saga]
    by_id = [m for m in found if m.saga_id == ref]
    names = {m.saga_name for m in by_id}
    if len(names) > 1:
        raise SeveralSagasError(ref, names)
    return by_id or found


def build_trace(
    messages: Iterable[ObservedMessage], *, now: datetime | None = None, source: str = "saga log"
) -> Trace | None:
    """The trace of one saga from its observed messages; ``None`` if there are none.

    Duplicates (the same message id) count once. If the messages belong to
    several sagas (a correlation id shared by more than one, or sagas of
    several names with one id), the saga of the earliest message is traced:
    :func:`messages_of` picks the saga a reference names.
    """
    unique: dict[str, ObservedMessage] = {}
    for message in messages:
        unique.setdefault(message.message_id, message)
    if not unique:
        return None
    # Ties (same millisecond) go by position in the topic: the order of publication.
    ordered = sorted(unique.values(), key=lambda m: (m.time, m.hop, m.topic, m.partition, m.offset))
    saga = (ordered[0].saga_name, ordered[0].saga_id)
    ordered = [m for m in ordered if (m.saga_name, m.saga_id) == saga]
    stamp: Stamp | None = None
    resumed = False
    for message in ordered:
        incoming = stamp_from_json(message.stamp)
        if message.event_type == DEADLINE_REACHED:
            incoming = deadline_counted(incoming, resumed=resumed)
        resumed = resumed or message.event_type == SAGA_RESUMED
        stamp = merge(stamp, incoming)
    assert stamp is not None
    start = min(stamp.started_at, ordered[0].time)
    entries = tuple(
        TraceEntry(
            time=m.time,
            delta_ms=_delta_ms(start, m.time),
            service=m.service,
            event_type=m.event_type,
            step=m.step,
            outcome=m.outcome,
            status=m.status,
            compensation=m.compensation,
            hop=m.hop,
            detail=m.detail,
            message_id=m.message_id,
            causation_id=m.causation_id,
            trace_id=m.trace_id,
        )
        for m in ordered
    )
    hops = {m.hop for m in ordered}
    missing_hops = tuple(sorted(set(range(max(hops) + 1)) - hops))
    ids = set(unique)
    missing_causes = tuple(
        dict.fromkeys(
            m.causation_id for m in ordered if m.causation_id and m.causation_id not in ids
        )
    )
    waiting = None
    if not stamp.status.is_terminal:
        last = ordered[-1]
        moment = now or datetime.now(UTC)
        waiting = Waiting(
            since=last.time,
            idle_seconds=max(0.0, (moment - last.time).total_seconds()),
            after=f"{entries[-1].event} from {last.service}",
            deadline=stamp.deadline,
        )
    return Trace(
        saga_name=stamp.saga_name,
        saga_id=stamp.saga_id,
        correlation_id=stamp.correlation_id,
        started_at=start,
        stamp=stamp,
        entries=entries,
        missing_hops=missing_hops,
        missing_causes=missing_causes,
        waiting=waiting,
        source=source,
        topic=ordered[0].topic,
    )


def trace_from_stamp(
    stamp: Stamp, *, updated_at: datetime | None = None, source: str = "service database"
) -> Trace:
    """A timeline from a service's saga view alone: its steps, no messages.

    A suspended saga gets a line for its suspension (the dead-lettered step,
    with the error), and waits since then. ``updated_at``, the view's last
    change, is named as such when it is clearly later than anything the view
    records.
    """
    start = stamp.started_at
    compensating = (StepOutcome.COMPENSATED, StepOutcome.COMPENSATION_FAILED)
    entries = [
        TraceEntry(
            time=s.at,
            delta_ms=_delta_ms(start, s.at),
            service=s.service,
            event_type=None,
            step=s.name,
            outcome=s.outcome.value,
            status=stamp.status.value,
            compensation=s.outcome in compensating,
        )
        for s in stamp.steps
    ]
    held = stamp.suspension
    if held is not None:
        entries.append(
            TraceEntry(
                time=held.at,
                delta_ms=_delta_ms(start, held.at),
                service=held.service,
                event_type=None,
                step=held.step,
                outcome="DEAD_LETTERED",
                status=stamp.status.value,
                compensation=held.role == "compensation",
                detail=f"suspended: {held.error}",
                message_id=held.message_id,
            )
        )
        entries.sort(key=lambda e: e.time)
    waiting = None
    if not stamp.status.is_terminal:
        # The latest thing the view knows happened, named for what it is.
        known = [(start, "the start")]
        known += [(s.at, f"step {s.name}") for s in stamp.steps]
        if held is not None:
            known.append((held.at, "the suspension"))
        since, after = max(known, key=lambda k: k[0])
        # The view is written a moment after what it records; a later change
        # that it has no time for (a status, a moved deadline) is named as such.
        if updated_at is not None and updated_at - since > _VIEW_WRITE:
            since, after = updated_at, "the last change to this service's saga view"
        waiting = Waiting(
            since=since,
            idle_seconds=max(0.0, (datetime.now(UTC) - since).total_seconds()),
            after=after,
            deadline=stamp.deadline,
        )
    return Trace(
        saga_name=stamp.saga_name,
        saga_id=stamp.saga_id,
        correlation_id=stamp.correlation_id,
        started_at=start,
        stamp=stamp,
        entries=tuple(entries),
        missing_hops=None,
        waiting=waiting,
        source=source,
    )


def entries_by_id(trace: Trace) -> Mapping[str, TraceEntry]:
    """The entries of a trace by message id."""
    return {e.message_id: e for e in trace.entries if e.message_id is not None}
