"""``saga status``: how many sagas are where, and which need a person.

A saga needs attention when it is:

* ``suspended``: a handler bug stopped it (``SagaSuspended``): its message is
  on a dead-letter topic until the code is fixed and the message replayed;
* ``stuck``: not terminal, and no message for longer than a threshold;
* ``failed``: ended ``FAILED`` (a compensation could not be done).

:func:`attention_kind` is the one place that decides.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox.database import read_connection
from saga.observe.log import NOT_TERMINAL, SagaLog, SagaSummary
from saga.observe.message import stamp_from_json
from saga.stamp import SagaStatus

__all__ = ["ATTENTION", "StatusReport", "attention_kind", "saga_metrics", "saga_status"]

ATTENTION = ("stuck", "suspended", "failed")
"""Kinds of sagas that need attention, in the order they are listed."""


def attention_kind(summary: SagaSummary, *, stuck_after: timedelta, now: datetime) -> str | None:
    """Why ``summary``'s saga needs attention (one of :data:`ATTENTION`), or ``None``."""
    status = SagaStatus(summary.status)
    if status is SagaStatus.FAILED:
        return "failed"
    # Suspended before stuck: it is idle too, but for a known reason.
    if not status.is_terminal and summary.stamp.suspension is not None:
        return "suspended"
    if not status.is_terminal and now - summary.last_message_at > stuck_after:
        return "stuck"
    return None


def _summary_dict(summary: SagaSummary, now: datetime) -> dict[str, Any]:
    return {
        "saga_name": summary.saga_name,
        "saga_id": summary.saga_id,
        "status": summary.status,
        "reason": summary.reason,
        "started_at": summary.started_at.isoformat(timespec="milliseconds"),
        "last_message_at": summary.last_message_at.isoformat(timespec="milliseconds"),
        "idle_seconds": round((now - summary.last_message_at).total_seconds(), 3),
        "messages": summary.messages,
        "suspension": None
        if summary.stamp.suspension is None
        else {
            "service": summary.stamp.suspension.service,
            "role": summary.stamp.suspension.role,
            "step": summary.stamp.suspension.step,
            "error": summary.stamp.suspension.error,
            "dead_letter_topic": summary.stamp.suspension.dead_letter_topic,
        },
        "last_step": None
        if not summary.stamp.steps
        else {
            "step": summary.stamp.steps[-1].name,
            "service": summary.stamp.steps[-1].service,
            "outcome": summary.stamp.steps[-1].outcome.value,
        },
    }


@dataclass(frozen=True, kw_only=True)
class StatusReport:
    """Sagas by name and status, and the ones that need attention."""

    at: datetime
    """When the report was made."""
    stuck_after: timedelta
    """Idle time after which a running saga counts as stuck."""
    counts: list[tuple[str, str, int]]
    """``(saga name, status, count)``."""
    attention: dict[str, list[SagaSummary]] = field(default_factory=dict)
    """Sagas needing attention by kind (see :data:`ATTENTION`), oldest first."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        counts: dict[str, dict[str, int]] = {}
        for name, status, count in self.counts:
            counts.setdefault(name, {})[status] = count
        return {
            "at": self.at.isoformat(timespec="milliseconds"),
            "stuck_after_seconds": self.stuck_after.total_seconds(),
            "counts": counts,
            **{
                kind: [_summary_dict(s, self.at) for s in self.attention.get(kind, [])]
                for kind in ATTENTION
            },
        }

    def to_text(self) -> str:
        """A readable report."""
        lines = ["SAGA                 STATUS          COUNT"]
        for name, status, count in self.counts:
            lines.append(f"{name:<20} {status:<15} {count:>5}")
        if not self.counts:
            lines.append("(no saga observed yet)")
        for kind in ATTENTION:
            found = self.attention.get(kind, [])
            title = {
                "stuck": f"stuck (no message for more than {self.stuck_after.total_seconds():g}s)",
                "suspended": "suspended (a message is dead-lettered: fix, then saga dlq replay)",
                "failed": "failed",
            }[kind]
            lines.append("")
            lines.append(f"{title}: {len(found) or 'none'}")
            for s in found:
                idle = (self.at - s.last_message_at).total_seconds()
                last = s.stamp.steps[-1] if s.stamp.steps else None
                where = (
                    f"after {last.name} {last.outcome.value} ({last.service})"
                    if last
                    else "no step yet"
                )
                held = s.stamp.suspension
                if held is not None:
                    where = f"at {held.role} {held.step or ''} of {held.service}: {held.error}"
                lines.append(
                    f"  {s.saga_name} {s.saga_id}  {s.status}  idle {idle:.1f}s  {where}"
                    + (f"  reason: {s.reason}" if s.reason else "")
                )
        return "\n".join(lines)


async def saga_status(
    engine: AsyncEngine,
    *,
    stuck_after: timedelta = timedelta(minutes=5),
    log: SagaLog | None = None,
    limit: int = 100,
) -> StatusReport:
    """Read a status report from the saga log at ``engine``."""
    log = log or SagaLog(dialect=engine.dialect.name)
    now = datetime.now(UTC)
    counts = await log.counts(engine)
    candidates = await log.summaries(engine, statuses=NOT_TERMINAL, limit=limit)
    candidates += await log.summaries(engine, statuses=[SagaStatus.FAILED.value], limit=limit)
    attention: dict[str, list[SagaSummary]] = {kind: [] for kind in ATTENTION}
    for summary in candidates:
        kind = attention_kind(summary, stuck_after=stuck_after, now=now)
        if kind is not None:
            attention[kind].append(summary)
    return StatusReport(at=now, stuck_after=stuck_after, counts=counts, attention=attention)


async def saga_metrics(engine: AsyncEngine, *, log: SagaLog | None = None) -> dict[str, Any]:
    """Current saga metrics read off the saga log, no collector needed.

    ``in_flight``: sagas not ended, by saga name and last step
    (``(started)`` before any); ``time_to_end``: count, median and maximum
    seconds from start to last message of ended sagas, by saga name and
    status.
    """
    log = log or SagaLog(dialect=engine.dialect.name)
    c = log.sagas.c
    query = select(c.saga_name, c.status, c.started_at_ms, c.last_message_ms, c.stamp)
    in_flight: dict[str, dict[str, int]] = {}
    durations: dict[str, dict[str, list[float]]] = {}
    async with read_connection(engine) as conn:
        rows = (await conn.execute(query)).all()
    for row in rows:
        if row.status in NOT_TERMINAL:
            stamp = stamp_from_json(row.stamp)
            step = stamp.steps[-1].name if stamp.steps else "(started)"
            by_step = in_flight.setdefault(row.saga_name, {})
            by_step[step] = by_step.get(step, 0) + 1
        else:
            seconds = max(0.0, (row.last_message_ms - row.started_at_ms) / 1000)
            durations.setdefault(row.saga_name, {}).setdefault(row.status, []).append(seconds)
    return {
        "in_flight": in_flight,
        "time_to_end": {
            name: {
                status: {
                    "count": len(values),
                    "p50_seconds": round(statistics.median(values), 3),
                    "max_seconds": round(max(values), 3),
                }
                for status, values in sorted(by_status.items())
            }
            for name, by_status in sorted(durations.items())
        },
    }


def metrics_text(metrics: dict[str, Any]) -> str:
    """:func:`saga_metrics` for a terminal."""
    lines = ["in flight (by last step):"]
    for name, by_step in sorted(metrics["in_flight"].items()):
        for step, count in sorted(by_step.items()):
            lines.append(f"  {name:<20} {step:<24} {count:>5}")
    if not metrics["in_flight"]:
        lines.append("  none")
    lines.append("time to end:")
    for name, by_status in metrics["time_to_end"].items():
        for status, figures in by_status.items():
            lines.append(
                f"  {name:<20} {status:<12} {figures['count']:>5} sagas  "
                f"p50 {figures['p50_seconds']:.3f} s  max {figures['max_seconds']:.3f} s"
            )
    return "\n".join(lines)
