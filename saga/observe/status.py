"""``saga status``: how many sagas are where, and which need a person.

A saga needs attention when it is:

* ``stuck``: not terminal, and no message for longer than a threshold;
* ``failed``: ended ``FAILED`` (a compensation could not be done).

:func:`attention_kind` is the one place that decides; a saga stopped by a
handler bug (suspended, once stamps say so) is to be added there, with its
own list in :class:`StatusReport`, which already has the slot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from saga.observe.log import NOT_TERMINAL, SagaLog, SagaSummary
from saga.stamp import SagaStatus

__all__ = ["ATTENTION", "StatusReport", "attention_kind", "saga_status"]

ATTENTION = ("stuck", "suspended", "failed")
"""Kinds of sagas that need attention, in the order they are listed."""


def attention_kind(summary: SagaSummary, *, stuck_after: timedelta, now: datetime) -> str | None:
    """Why ``summary``'s saga needs attention (one of :data:`ATTENTION`), or ``None``."""
    status = SagaStatus(summary.status)
    if status is SagaStatus.FAILED:
        return "failed"
    # A "suspended" saga (stopped by a handler bug) will be recognised here,
    # before "stuck": it is idle too, but for a known reason.
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
                "suspended": "suspended",
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
    candidates = await log.summaries(
        engine, statuses=NOT_TERMINAL, idle_longer_than=stuck_after, limit=limit
    )
    candidates += await log.summaries(engine, statuses=[SagaStatus.FAILED.value], limit=limit)
    attention: dict[str, list[SagaSummary]] = {kind: [] for kind in ATTENTION}
    for summary in candidates:
        kind = attention_kind(summary, stuck_after=stuck_after, now=now)
        if kind is not None:
            attention[kind].append(summary)
    return StatusReport(at=now, stuck_after=stuck_after, counts=counts, attention=attention)
