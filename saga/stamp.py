"""The state stamp: where a saga stands, carried by every one of its messages.

A stamp names the saga (name and id), gives its status and the ordered list of
steps done so far with their outcome, time and small result data, plus the
correlation id and a version that grows with every change. The framework
updates it; handlers read it. Its Avro schema is
``schemas/choreosaga/saga/Stamp.v2.avsc`` (``Stamp.avsc`` is its first
version, without the suspension and the hop: stamps written with it stay
readable).

Hops: each message's stamp also says where that message stands in its saga,
so that a trace can tell whether messages are missing. The rule:

* the messages that start a saga (the first event and its deadline message)
  have hop 0;
* every other message has hop ``h + 1``, where ``h`` is the highest hop the
  emitting service has seen for the saga: the merge of the incoming stamp
  with the service's view (``saga.state.merge`` keeps the maximum). Messages
  written in one transaction share their hop.

Branches running in parallel therefore share hop numbers, and a service that
has seen more of the saga jumps ahead of the message that woke it. What
holds in every case: a message of hop ``k > 0`` exists only if a message of
hop ``k - 1`` was consumed before it, so in a complete trace the hops are
``0..n`` with no gap. A gap names a missing hop; a ``causation_id`` that
points at no message of the trace names a missing message, even when a
sibling of the same hop is present.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from saga.errors import ConfigurationError

__all__ = [
    "MAX_STEP_DATA_ITEMS",
    "STAMP_SCHEMA",
    "SagaStatus",
    "Stamp",
    "StepOutcome",
    "StepRecord",
    "Suspension",
]

STAMP_SCHEMA = "choreosaga.saga.Stamp"
"""Full name of the stamp's Avro schema."""

MAX_STEP_DATA_ITEMS = 32
"""Most result data items one step may carry."""
_MAX_DATA_VALUE = 1024


class SagaStatus(enum.Enum):
    """Lifecycle of a saga."""

    RUNNING = "RUNNING"
    """Steps are moving forward."""
    COMPENSATING = "COMPENSATING"
    """A step failed; completed steps are being undone in reverse order."""
    COMPLETED = "COMPLETED"
    """Every step succeeded (terminal)."""
    COMPENSATED = "COMPENSATED"
    """A step failed and every completed step was undone (terminal)."""
    FAILED = "FAILED"
    """A compensation could not be done; needs a person (terminal)."""

    @property
    def is_terminal(self) -> bool:
        """Whether the saga can no longer change."""
        return self in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED)


class StepOutcome(enum.Enum):
    """What happened to one step."""

    DONE = "DONE"
    """The step's local transaction committed."""
    FAILED = "FAILED"
    """The step refused (a business outcome); nothing of it needs undoing."""
    COMPENSATED = "COMPENSATED"
    """The step was undone."""
    COMPENSATION_FAILED = "COMPENSATION_FAILED"
    """Undoing the step failed for good."""


def _utc(moment: datetime) -> datetime:
    if not isinstance(moment, datetime) or moment.tzinfo is None:
        raise ConfigurationError(f"stamp times must be timezone-aware datetimes, not {moment!r}")
    # Avro timestamp-millis keeps milliseconds: truncate now so that a stamp
    # compares equal to itself after a round trip.
    utc = moment.astimezone(UTC)
    return utc.replace(microsecond=utc.microsecond // 1000 * 1000)


@dataclass(frozen=True, kw_only=True)
class StepRecord:
    """One step in a stamp."""

    name: str
    """Step name, e.g. ``reserve_stock``."""

    service: str
    """Service that performed it."""

    outcome: StepOutcome
    """What happened to it."""

    at: datetime
    """When that happened (UTC, millisecond precision)."""

    data: Mapping[str, str] = field(default_factory=dict)
    """Small result data, such as a reservation id (strings, at most 32 items)."""

    def __post_init__(self) -> None:
        if not self.name or not self.service:
            raise ConfigurationError("a step needs a name and a service")
        object.__setattr__(self, "at", _utc(self.at))
        if len(self.data) > MAX_STEP_DATA_ITEMS:
            raise ConfigurationError(f"step data holds at most {MAX_STEP_DATA_ITEMS} items")
        for key, value in self.data.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ConfigurationError(f"step data must map str to str, not {key!r}: {value!r}")
            if len(value) > _MAX_DATA_VALUE:
                raise ConfigurationError(
                    f"step data value {key!r} is longer than {_MAX_DATA_VALUE} characters: "
                    "keep large results in the service's own tables"
                )
        object.__setattr__(self, "data", MappingProxyType(dict(self.data)))

    @property
    def key(self) -> tuple[str, str]:
        """The step's identity, (service, name): services may use the same step names."""
        return (self.service, self.name)


@dataclass(frozen=True, kw_only=True)
class Suspension:
    """Where a saga stopped because a handler failed as a bug.

    The message went to a dead-letter topic; the saga waits here (it is not
    compensated) until the code is fixed and the message replayed, which
    clears the suspension.
    """

    service: str
    """Service whose handler failed."""

    role: str
    """Which handler: ``"step"``, ``"compensation"``, ``"end"``, ``"handler"`` or
    ``"initiator"`` (the initiator's own bookkeeping: deadline, abort, suspension)."""

    step: str | None
    """The step being performed or compensated, if any."""

    message_id: str
    """``ce_id`` of the dead-lettered message (its replay clears the suspension)."""

    event_type: str
    """``ce_type`` of the dead-lettered message."""

    error: str
    """Error type and message (never the payload)."""

    attempts: int
    """Attempts made before giving up."""

    dead_letter_topic: str
    """Where the message went."""

    at: datetime
    """When the saga was suspended (UTC, millisecond precision)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "at", _utc(self.at))
        object.__setattr__(self, "error", self.error[:1000])

    def to_avro(self) -> dict[str, Any]:
        """The suspension as an Avro record."""
        return {
            "service": self.service,
            "role": self.role,
            "step": self.step,
            "message_id": self.message_id,
            "event_type": self.event_type,
            "error": self.error,
            "attempts": self.attempts,
            "dead_letter_topic": self.dead_letter_topic,
            "at": self.at,
        }

    @classmethod
    def from_avro(cls, record: Mapping[str, Any]) -> Suspension:
        """Build a suspension from its decoded Avro record."""
        return cls(**record)


@dataclass(frozen=True, kw_only=True)
class Stamp:
    """The state of one saga, as of the message that carries it."""

    saga_name: str
    """Saga type, e.g. ``place_order``."""

    saga_id: str
    """Saga instance id."""

    status: SagaStatus
    """Current status."""

    steps: tuple[StepRecord, ...] = ()
    """Steps so far, in the order they happened (compensations appended)."""

    correlation_id: str
    """Id shared by every message of the saga and anything it causes."""

    started_at: datetime
    """When the saga started."""

    deadline: datetime | None = None
    """When the saga must be finished; after it, compensation starts. The initiator
    moves it later when a suspended saga resumes; merged stamps keep the latest."""

    reason: str | None = None
    """Why the saga is compensating or failed."""

    version: int = 1
    """Revision of this state, incremented by every change."""

    suspension: Suspension | None = None
    """Set while the saga is suspended at a handler that failed as a bug."""

    @property
    def suspended(self) -> bool:
        """Whether the saga waits at a dead-lettered message (see :class:`Suspension`)."""
        return self.suspension is not None and not self.status.is_terminal

    hop: int = 0
    """Position of the message carrying this stamp in the saga (see the module docstring)."""

    def __post_init__(self) -> None:
        if not self.saga_name or not self.saga_id or not self.correlation_id:
            raise ConfigurationError("a stamp needs a saga name, a saga id and a correlation id")
        object.__setattr__(self, "steps", tuple(self.steps))
        object.__setattr__(self, "started_at", _utc(self.started_at))
        if self.deadline is not None:
            object.__setattr__(self, "deadline", _utc(self.deadline))
        if self.version < 1:
            raise ConfigurationError("stamp version starts at 1")
        if self.hop < 0:
            raise ConfigurationError("stamp hop starts at 0")

    def with_step(self, step: StepRecord) -> Stamp:
        """Return a new revision with ``step`` appended."""
        return replace(self, steps=(*self.steps, step), version=self.version + 1)

    def with_status(self, status: SagaStatus, reason: str | None = None) -> Stamp:
        """Return a new revision with another status (and reason, if given)."""
        return replace(
            self,
            status=status,
            reason=self.reason if reason is None else reason,
            version=self.version + 1,
        )

    def next_hop(self) -> Stamp:
        """This stamp as carried by a message emitted after it (``hop + 1``)."""
        return replace(self, hop=self.hop + 1)

    def to_compensate(self) -> list[StepRecord]:
        """Steps done and not yet compensated, most recent first (LIFO).

        A step is (service, name): undoing one service's step leaves another
        service's step of the same name to undo.
        """
        undone = {
            s.key
            for s in self.steps
            if s.outcome in (StepOutcome.COMPENSATED, StepOutcome.COMPENSATION_FAILED)
        }
        done = [s for s in self.steps if s.outcome is StepOutcome.DONE and s.key not in undone]
        return list(reversed(done))

    def step(self, name: str, service: str | None = None) -> StepRecord | None:
        """The latest record of step ``name`` (of ``service``, if given), if any."""
        for record in reversed(self.steps):
            if record.name == name and service in (None, record.service):
                return record
        return None

    def to_avro(self) -> dict[str, Any]:
        """The stamp as an Avro record of ``choreosaga.saga.Stamp``."""
        return {
            "version": self.version,
            "saga_name": self.saga_name,
            "saga_id": self.saga_id,
            "status": self.status.value,
            "steps": [
                {
                    "name": s.name,
                    "service": s.service,
                    "outcome": s.outcome.value,
                    "at": s.at,
                    "data": dict(s.data),
                }
                for s in self.steps
            ],
            "correlation_id": self.correlation_id,
            "started_at": self.started_at,
            "deadline": self.deadline,
            "reason": self.reason,
            "suspension": None if self.suspension is None else self.suspension.to_avro(),
            "hop": self.hop,
        }

    @classmethod
    def from_avro(cls, record: Mapping[str, Any]) -> Stamp:
        """Build a stamp from a decoded ``choreosaga.saga.Stamp`` record."""
        return cls(
            version=record["version"],
            saga_name=record["saga_name"],
            saga_id=record["saga_id"],
            status=SagaStatus(record["status"]),
            steps=tuple(
                StepRecord(
                    name=s["name"],
                    service=s["service"],
                    outcome=StepOutcome(s["outcome"]),
                    at=s["at"],
                    data=s["data"],
                )
                for s in record["steps"]
            ),
            correlation_id=record["correlation_id"],
            started_at=record["started_at"],
            deadline=record["deadline"],
            reason=record["reason"],
            suspension=(
                None
                if record.get("suspension") is None
                else Suspension.from_avro(record["suspension"])
            ),
            hop=record.get("hop", 0),
        )
