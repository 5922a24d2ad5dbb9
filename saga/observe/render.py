"""Traces as text: a terminal table, JSON, or a Mermaid sequence diagram."""

from __future__ import annotations

import json
import re
from datetime import UTC

from saga.observe.trace import Trace, entries_by_id

__all__ = ["FORMATS", "render_trace", "trace_json", "trace_mermaid", "trace_table"]

FORMATS = ("table", "json", "mermaid")
"""Output formats of ``saga trace``."""

_UNDO = "<<"


def trace_json(trace: Trace) -> str:
    """The trace as indented JSON."""
    return json.dumps(trace.to_dict(), indent=2, sort_keys=False)


def trace_table(trace: Trace) -> str:
    """The trace as a table for a terminal; compensations are marked ``<<``."""
    lines = [
        f"saga {trace.saga_name} {trace.saga_id}  (correlation {trace.correlation_id}, "
        f"from the {trace.source})",
        f"started {trace.started_at.astimezone(UTC).isoformat(timespec='milliseconds')}",
        "",
    ]
    header = ("TIME", "+MS", "HOP", "SERVICE", "EVENT", "STEP", "OUTCOME", "")
    rows = [
        (
            e.time.astimezone(UTC).strftime("%H:%M:%S.%f")[:-3],
            f"+{e.delta_ms}",
            "" if e.hop is None else str(e.hop),
            e.service,
            e.event,
            e.step or "",
            e.outcome or "",
            _UNDO if e.compensation else "",
        )
        for e in trace.entries
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {1, 2}
    for row in [header, *rows]:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    lines.append("")
    lines.append(trace.explanation())
    if trace.missing_hops is None:
        lines.append("missing messages: unknown (only this service's view of the saga was read)")
    elif trace.complete:
        top = max((e.hop for e in trace.entries if e.hop is not None), default=0)
        lines.append(f"missing messages: none (hops 0..{top}, {len(trace.entries)} messages)")
    else:
        if trace.missing_hops:
            lines.append("missing hops: " + ", ".join(str(h) for h in trace.missing_hops))
        if trace.missing_causes:
            lines.append("missing messages (causes not seen): " + ", ".join(trace.missing_causes))
    if any(e.compensation for e in trace.entries):
        lines.append(f"{_UNDO} marks the compensation path")
    return "\n".join(lines)


def _participant(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name) or "unknown"


def trace_mermaid(trace: Trace) -> str:
    """The trace as a Mermaid ``sequenceDiagram``.

    Each message is an arrow from the service that emitted it to each
    service whose next message it caused (to the saga topic when nothing was
    seen to follow it); compensations are dashed arrows.
    """
    by_id = entries_by_id(trace)
    consumers: dict[str, list[str]] = {}
    for entry in trace.entries:
        cause = by_id.get(entry.causation_id or "")
        # A message written in the same transaction as its cause (same hop, like a
        # deadline with the first event) was not consumed from it.
        same_transaction = (
            cause is not None
            and cause.hop is not None
            and entry.hop is not None
            and entry.hop <= cause.hop
        )
        if cause is not None and cause.message_id is not None and not same_transaction:
            targets = consumers.setdefault(cause.message_id, [])
            if entry.service not in targets:
                targets.append(entry.service)
    services = list(dict.fromkeys(e.service for e in trace.entries))
    lines = ["sequenceDiagram", f"    title {trace.saga_name} {trace.saga_id}"]
    lines += [f"    participant {_participant(s)} as {s}" for s in services]
    lines.append("    participant saga_topic as (saga topic)")
    for entry in trace.entries:
        arrow = "-->>" if entry.compensation else "->>"
        label = entry.event
        if entry.step:
            label += f" [{entry.step} {entry.outcome}]"
        label = label.replace(";", ",").replace("#", "")
        for target in consumers.get(entry.message_id or "", ["saga_topic"]):
            to = target if target == "saga_topic" else _participant(target)
            lines.append(
                f"    {_participant(entry.service)}{arrow}{to}: +{entry.delta_ms}ms {label}"
            )
    where = _participant(trace.entries[-1].service) if trace.entries else "saga_topic"
    note = trace.explanation().replace(";", ",").replace("#", "")
    lines.append(f"    Note over {where}: {note}")
    return "\n".join(lines)


def render_trace(trace: Trace, fmt: str) -> str:
    """Render in one of :data:`FORMATS`."""
    if fmt == "json":
        return trace_json(trace)
    if fmt == "mermaid":
        return trace_mermaid(trace)
    return trace_table(trace)
