"""The verdict of a run (L, D, O, T), read from the databases and the wire, as a table."""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from saga import StepOutcome
from saga.choreography import SAGA_ENDED
from services import PAYMENT_CHARGED, SAGA, SHIPMENT_CREATED, STOCK_RESERVED
from services.scenarios import OrderRequest, Scenario
from services.shop import FORWARD, TERMINAL, Shop

from .cluster import Cluster
from .faults import FaultLog
from .wire import WireRecord

EFFECTS = (STOCK_RESERVED, PAYMENT_CHARGED, SHIPMENT_CREATED)
"""Events that announce an effect: one per saga at most, whatever was redelivered."""

# Shop.check's names, by the guarantee they belong to.
_D_CHECKS = (
    "stock back where it started for every order not completed",
    "no charge without either a shipment or a refund",
    "shipments only for completed orders",
)
_C_CHECKS = ("stamps show every step, compensations in reverse order",)
"""Reported, not a verdict: it judges compensation order by when a step was done,
while the initiator can only undo a step once it has heard of it (a step done
before the deadline but reported after it is undone last). Which rule holds is
an open question of the design; the table shows the outcome as WARN."""


@dataclass
class Report:
    """Figures and verdicts of one run."""

    seed: int
    orders: int
    faults: dict[str, int]
    faults_not_fired: list[str]
    wire_records: int
    duplicates_on_wire: int
    duplicates_applied: int
    lost: int
    order_violations: int
    handling_order_violations: int
    not_ended: list[str]
    outcomes: dict[str, int]
    suspended: list[str]
    dead_letters: int
    heal_seconds: float | None
    heal_bound: float
    on_time: float
    late: dict[str, int]
    late_faults: dict[str, int]
    late_waiting: dict[str, int]
    """Late sagas by the step they were waiting for when their deadline came."""
    latency: dict[str, float]
    hops: dict[str, tuple[float, float, float]]
    """Per hop (a service's relay, a service's consumer), p50, p99 and max seconds."""
    durations: dict[str, tuple[float, float]]
    """Per fault kind, mean and longest time from the fault until the part was whole
    again (a killed process restarted and ready, the broker resumed)."""
    checks: list[tuple[str, str, bool, str]] = field(default_factory=list)
    """(guarantee, name, ok, detail) of every check; guarantee C is reported only."""
    details: list[str] = field(default_factory=list)
    workdir: str = ""

    @property
    def violations(self) -> list[str]:
        """The checks that failed (empty: the run passed)."""
        return [
            f"{g} {name}: {detail}" for g, name, ok, detail in self.checks if not ok and g != "C"
        ]

    def table(self) -> str:
        """The printed table of the run."""
        rows: list[tuple[str, str]] = [
            ("seed", str(self.seed)),
            ("orders", str(self.orders)),
            ("faults injected", str(sum(self.faults.values()))),
        ]
        rows += [(f"  {kind}", str(n)) for kind, n in sorted(self.faults.items())]
        if self.faults_not_fired:
            rows.append(("  not fired", "; ".join(self.faults_not_fired)))
        rows += [
            ("records on the wire", str(self.wire_records)),
            ("duplicates seen on the wire", str(self.duplicates_on_wire)),
            ("duplicates applied (must be 0)", str(self.duplicates_applied)),
            ("lost (must be 0)", str(self.lost)),
            ("order violations (must be 0)", str(self.order_violations)),
            ("  of which handling order", str(self.handling_order_violations)),
            ("sagas terminal", str(sum(self.outcomes.values()))),
        ]
        rows += [(f"  {outcome}", str(n)) for outcome, n in sorted(self.outcomes.items())]
        rows += [
            ("sagas not ended (must be 0)", str(len(self.not_ended))),
            (
                "suspended sagas (dead letters)",
                f"{len(self.suspended)} ({self.dead_letters} dead-letter records)",
            ),
        ]
        rows += [(f"  {s}", "") for s in self.suspended[:10]]
        heal = "not healed" if self.heal_seconds is None else f"{self.heal_seconds:.1f} s"
        rows += [
            ("time to heal", f"{heal} (bound {self.heal_bound:.0f} s)"),
            ("on-time share (target 95%)", f"{self.on_time:.1%}"),
        ]
        if self.latency:
            rows.append(
                (
                    "  saga latency p50/p95/max",
                    " / ".join(f"{self.latency[k]:.2f} s" for k in ("p50", "p95", "max")),
                )
            )
        if self.hops:
            rows.append(("  time per hop, p50 / p99 / max", ""))
            rows += [
                (f"    {hop}", " / ".join(f"{x:.2f} s" for x in figures))
                for hop, figures in self.hops.items()
            ]
        if self.durations:
            rows.append(("  fault until whole again, mean / max", ""))
            rows += [
                (f"    {kind}", f"{mean:.1f} s / {longest:.1f} s")
                for kind, (mean, longest) in sorted(self.durations.items())
            ]
        if self.late:
            rows.append(("  late sagas, how they ended", ""))
            rows += [(f"    {k}", str(n)) for k, n in sorted(self.late.items())]
            rows.append(("  late sagas, waiting for", ""))
            rows += [(f"    {k}", str(n)) for k, n in sorted(self.late_waiting.items())]
            rows.append(("  faults during the late sagas", ""))
            rows += [(f"    {k}", str(n)) for k, n in sorted(self.late_faults.items())]
        width = max(len(k) for k, _ in rows) + 2
        lines = [f"{k:<{width}}{v}".rstrip() for k, v in rows]
        lines.append("")
        for guarantee, name, ok, detail in self.checks:
            mark = "ok  " if ok else "WARN" if guarantee == "C" else "FAIL"
            lines.append(f"{mark} {guarantee} {name}: {detail}")
        verdict = "PASS" if not self.violations else f"FAIL ({len(self.violations)} violations)"
        lines.append(f"verdict: {verdict}")
        return "\n".join(lines)


async def _rows(engine: Any, table: sa.Table, *columns: str) -> list[Any]:
    async with engine.connect() as conn:
        query = sa.select(*(table.c[c] for c in columns)) if columns else sa.select(table)
        return list((await conn.execute(query)).all())


def _source(service: str) -> str:
    return f"/choreosaga/{service}"


async def collect(
    *,
    shop: Shop,
    cluster: Cluster,
    wire: Sequence[WireRecord],
    orders: Mapping[str, tuple[OrderRequest, Scenario]],
    faults: FaultLog,
    options_seed: int,
    heal_seconds: float | None,
    heal_bound: float,
) -> Report:
    """Read the databases, compare them with the wire, and judge the run."""
    topic = cluster.prefix + SAGA
    services = {
        "order": shop.order,
        "inventory": shop.inventory,
        "payment": shop.payments[0],
        "shipping": shop.shipping,
    }
    saga_wire = sorted((r for r in wire if r.topic == topic), key=lambda r: (r.partition, r.offset))
    dlq_wire = [r for r in wire if r.topic != topic]
    checks: list[tuple[str, str, bool, str]] = []

    # -- L: every published row on the wire; no due row left behind ----------------
    seen = {(r.ce_source, r.ce_id) for r in saga_wire}
    outbox_ids: dict[tuple[str, str], int] = {}
    missing: list[str] = []
    unpublished = Counter[str]()
    lags: dict[str, list[float]] = defaultdict(list)
    """Seconds per hop: outbox row ready -> marked published; on the wire -> handled."""
    rows_on_topic = 0
    for name, svc in services.items():
        t = svc.service.tables.outbox
        rows = await _rows(
            svc.engine,
            t,
            "id",
            "message_id",
            "topic",
            "created_at_ms",
            "due_at_ms",
            "published_at_ms",
            "parked_at_ms",
        )
        for row in rows:
            if row.topic == topic and row.published_at_ms is not None:
                ready = max(row.created_at_ms, row.due_at_ms or 0)
                lags[f"relay {name}"].append((row.published_at_ms - ready) / 1000)
            if row.topic == topic:
                rows_on_topic += 1
            if row.topic == topic and row.due_at_ms is None:
                # Scheduled rows go out when due, not in commit order: not compared.
                outbox_ids[(_source(name), row.message_id)] = row.id
            if row.parked_at_ms is not None and row.published_at_ms is None:
                unpublished[f"{name} parked"] += 1
            elif row.published_at_ms is None:
                unpublished[f"{name} pending"] += 1
            elif row.topic == topic and (_source(name), row.message_id) not in seen:
                missing.append(f"{name}:{row.id}")
    lost = len(missing) + sum(unpublished.values())
    checks.append(
        (
            "L",
            "every outbox row published and on the wire",
            lost == 0,
            f"{rows_on_topic} rows on {topic}, all on the wire"
            if lost == 0
            else f"unpublished {dict(unpublished)}, published but not on the wire {missing[:5]}",
        )
    )

    statuses = await shop.statuses()
    not_ended = sorted(o for o in orders if statuses.get(o, ("missing", None))[0] not in TERMINAL)
    checks.append(
        (
            "L",
            "every order saga terminal",
            not not_ended,
            f"{len(orders)} orders terminal" if not not_ended else f"not ended: {not_ended[:5]}",
        )
    )

    # -- D: no effect applied twice -------------------------------------------------
    by_id: dict[tuple[str, str], list[WireRecord]] = defaultdict(list)
    for r in saga_wire:
        by_id[(r.ce_source, r.ce_id)].append(r)
    duplicates_on_wire = sum(len(v) - 1 for v in by_id.values())
    effects: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in saga_wire:
        if r.ce_type in EFFECTS:
            effects[(r.key, r.ce_type)].add(r.ce_id)
    twice = {k: len(v) for k, v in effects.items() if len(v) > 1}
    inv = shop.inventory
    reservations = Counter(r.order_id for r in await _rows(inv.engine, inv.reservations))
    pay = shop.payments[0]
    payments = Counter(r.order_id for r in await _rows(pay.engine, pay.payments))
    ship = shop.shipping
    shipments = Counter(r.order_id for r in await _rows(ship.engine, ship.shipments))
    rows_twice = {
        f"{what} {o}": n
        for what, counter in (
            ("reservation", reservations),
            ("payment", payments),
            ("shipment", shipments),
        )
        for o, n in counter.items()
        if n > 1
    }
    duplicates_applied = sum(n - 1 for n in twice.values()) + sum(
        n - 1 for n in rows_twice.values()
    )
    checks.append(
        (
            "D",
            "one reservation, charge and shipment per saga (database and wire)",
            duplicates_applied == 0,
            f"{len(effects)} effects, each once"
            if duplicates_applied == 0
            else f"applied twice: {dict(list(twice.items())[:5])} "
            f"{dict(list(rows_twice.items())[:5])}",
        )
    )
    for check in await shop.check(orders):
        if check.name in _D_CHECKS:
            checks.append(("D", check.name, check.ok, check.detail))
        elif check.name in _C_CHECKS:
            checks.append(("C", check.name, check.ok, check.detail))

    # -- O: per key, first deliveries in commit (outbox id) order --------------------
    first: dict[tuple[str, str], WireRecord] = {}
    for r in saga_wire:
        first.setdefault((r.ce_source, r.ce_id), r)
    per_key: dict[tuple[str, str], list[int]] = defaultdict(list)
    for r in sorted(first.values(), key=lambda r: (r.partition, r.offset)):
        row_id = outbox_ids.get((r.ce_source, r.ce_id))
        if row_id is not None:
            per_key[(r.ce_source, r.key)].append(row_id)
    out_of_order = {k: ids for k, ids in per_key.items() if ids != sorted(ids)}
    checks.append(
        (
            "O",
            "per key, first deliveries in outbox id order",
            not out_of_order,
            f"{len(per_key)} (source, key) sequences in order"
            if not out_of_order
            else "out of order: "
            + "; ".join(f"{s} {k}: {ids}" for (s, k), ids in list(out_of_order.items())[:5]),
        )
    )
    offset_of = {(r.ce_id): (r.partition, r.offset) for r in first.values()}
    key_of = {r.ce_id: r.key for r in first.values()}
    first_sent = {r.ce_id: r.timestamp_ms for r in first.values()}
    handled_wrong: list[str] = []
    for name, svc in services.items():
        inbox = svc.service.tables.inbox
        rows = await _rows(svc.engine, inbox, "consumer", "message_id", "received_at_ms")
        per_saga: dict[str, list[tuple[tuple[int, int], int, str]]] = defaultdict(list)
        for row in rows:
            if row.consumer != name or row.message_id not in offset_of:
                continue
            sent = first_sent[row.message_id]
            lags[f"consumer {name}"].append(max(0, row.received_at_ms - sent) / 1000)
            per_saga[key_of[row.message_id]].append(
                (offset_of[row.message_id], row.received_at_ms, row.message_id)
            )
        for saga_id, handled in per_saga.items():
            handled.sort()
            times = [t for _, t, _ in handled]
            if times != sorted(times):
                handled_wrong.append(f"{name} {saga_id}")
    checks.append(
        (
            "O",
            "every service handled each saga's events in wire order",
            not handled_wrong,
            "in order" if not handled_wrong else f"out of order: {handled_wrong[:5]}",
        )
    )
    order_violations = len(out_of_order) + len(handled_wrong)

    # -- T: ended, within the bound; suspended sagas listed --------------------------
    stamps = {s.saga_id: s for s in await shop.order.service.states.all(shop.order.engine, SAGA)}
    suspended = []
    for name, svc in services.items():
        for stamp in await svc.service.states.all(svc.engine, SAGA):
            if stamp.suspended and stamp.suspension is not None:
                s = stamp.suspension
                suspended.append(f"{stamp.saga_id} at {name} {s.role} {s.step}: {s.error[:80]}")
    outcomes = Counter(
        _outcome(status, reason) for o, (status, reason) in statuses.items() if status in TERMINAL
    )
    healed = heal_seconds is not None and heal_seconds <= heal_bound
    checks.append(
        (
            "T",
            "every saga ended within the bound after the faults stopped",
            healed and not not_ended,
            f"healed in {heal_seconds:.1f} s (bound {heal_bound:.0f} s)"
            if healed and heal_seconds is not None
            else f"not healed within {heal_bound:.0f} s; not ended now: {len(not_ended)}; "
            f"suspended: {suspended[:5]}",
        )
    )

    # -- on time, and where the time goes --------------------------------------------
    wall = time.time() - time.monotonic()
    ended: dict[str, float] = {}
    """When each saga's end was first announced on the wire (epoch seconds)."""
    for r in first.values():
        if r.ce_type == SAGA_ENDED and r.ce_source == _source("order"):
            ended[r.key] = min(ended.get(r.key, math.inf), r.timestamp_ms / 1000)
    on_time = 0
    late: Counter[str] = Counter()
    late_faults: Counter[str] = Counter()
    waiting: Counter[str] = Counter()
    latencies = []
    for order_id, (_, scenario) in orders.items():
        status, reason = statuses.get(order_id, ("missing", None))
        stamp = stamps.get(order_id)
        if status == scenario.expected_status and (
            scenario is Scenario.COMPLETED or scenario.value in (reason or "")
        ):
            on_time += 1
            if stamp is not None and stamp.steps and scenario is Scenario.COMPLETED:
                latencies.append(ended.get(order_id, time.time()) - stamp.started_at.timestamp())
            continue
        late[f"{scenario.value} -> {_outcome(status, reason)}"] += 1
        if stamp is not None:
            done = {st.name for st in stamp.steps if st.outcome is not StepOutcome.FAILED}
            waiting[next((st for st in FORWARD if st not in done), "the end")] += 1
            begin = stamp.started_at.timestamp() - wall
            end = ended.get(order_id, time.time()) - wall
            for f in faults.faults:
                if f.fired and f.started <= end and (f.ended or end) >= begin:
                    late_faults[f.kind] += 1
    latency = {}
    if latencies:
        latencies.sort()
        latency = {
            "p50": statistics.median(latencies),
            "p95": latencies[min(len(latencies) - 1, int(len(latencies) * 0.95))],
            "max": latencies[-1],
        }
    spans: dict[str, list[float]] = defaultdict(list)
    for f in faults.faults:
        if f.fired and f.ended:
            spans[f.kind].append(f.ended - f.started)
    durations = {k: (statistics.mean(v), max(v)) for k, v in spans.items()}
    hops = {k: _percentiles(v) for k, v in sorted(lags.items()) if v}
    return Report(
        seed=options_seed,
        orders=len(orders),
        faults=faults.by_kind(),
        faults_not_fired=[f"{f.kind} {f.target}{f.detail}" for f in faults.faults if not f.fired],
        wire_records=len(wire),
        duplicates_on_wire=duplicates_on_wire,
        duplicates_applied=duplicates_applied,
        lost=lost,
        order_violations=order_violations,
        handling_order_violations=len(handled_wrong),
        not_ended=not_ended,
        outcomes=dict(outcomes),
        suspended=suspended,
        dead_letters=len(dlq_wire),
        heal_seconds=heal_seconds,
        heal_bound=heal_bound,
        on_time=on_time / max(len(orders), 1),
        late=dict(late),
        late_faults=dict(late_faults),
        late_waiting=dict(waiting),
        latency=latency,
        durations=durations,
        hops=hops,
        checks=checks,
        details=[f"{f.kind} {f.target} {f.detail}" for f in faults.faults],
    )


def _percentiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    return (
        statistics.median(ordered),
        ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        ordered[-1],
    )


def _outcome(status: str, reason: str | None) -> str:
    if status != "rejected" or not reason:
        return status
    return f"rejected: {reason.split(':')[0]}"
