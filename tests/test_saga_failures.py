"""Sagas whose handlers break: refusals compensate, bugs suspend the saga visibly.

A small three-step saga (alpha -> beta -> gamma) with an initiator, each
service on its own SQLite database, on the real broker. The failure modes are
chosen per saga by the data (``n``), as an application would.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from support import core_codec

from saga import (
    DeadLetter,
    DeadLetterSelection,
    KafkaSettings,
    OutboxTables,
    RelaySettings,
    RetryPolicy,
    SagaContext,
    SagaStatus,
    Service,
    ServiceSettings,
    Stamp,
    StepOutcome,
    create_engine,
    ensure_topics,
    read_dead_letters,
)
from saga.observe import trace_from_service

SAGA = "test_saga"
STARTED = "choreosaga.test.Started"
ALPHA_DONE = "choreosaga.test.AlphaDone"
BETA_DONE = "choreosaga.test.BetaDone"

BETA_UNDO_BREAKS = 1  # beta's compensation raises every time (a bug)
GAMMA_REFUSES = 2  # gamma fails the saga (a business outcome)
GAMMA_CRASHES = 3  # gamma's handler raises a bug, every attempt
BETA_SILENT = 4  # beta's handler neither emits nor fails
BETA_UNDO_FLAKY = 5  # beta's compensation fails twice with a transient error
BETA_STALLS = 6  # beta waits for an answer due in an hour (and there is no deadline)
GAMMA_ALWAYS_FLAKY = 7  # gamma raises a retriable error on every attempt


class Flaky(Exception):
    retriable = True


@dataclass
class Harness:
    services: dict[str, Service]
    engines: dict[str, Any]
    log: sa.Table
    ended: sa.Table
    attempts: dict[str, int]
    kafka: KafkaSettings
    topic: str

    async def start(self, n: int) -> str:
        saga_id = f"saga-{n}-{uuid.uuid4().hex[:6]}"
        starter = self.services["starter"]
        async with AsyncSession(self.engines["starter"]) as session, session.begin():
            await starter.start_saga(
                session, SAGA, saga_id=saga_id, event_type=STARTED, data={"n": n}
            )
        return saga_id

    async def ended_as(self, saga_id: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            async with self.engines["starter"].connect() as conn:
                status = (
                    await conn.execute(
                        sa.select(self.ended.c.status).where(self.ended.c.saga_id == saga_id)
                    )
                ).scalar()
            if status is not None:
                return str(status)
            assert time.monotonic() < deadline, f"saga {saga_id} did not end"
            await asyncio.sleep(0.05)

    async def suspended(self, service: str, saga_id: str, timeout: float = 30.0) -> Stamp:
        deadline = time.monotonic() + timeout
        while True:
            stamp = await self.services[service].saga_state(saga_id)
            if stamp is not None and stamp.suspension is not None:
                return stamp
            assert time.monotonic() < deadline, f"saga {saga_id} not suspended at {service}"
            await asyncio.sleep(0.05)

    async def dead_letters(self, saga_id: str, timeout: float = 30.0) -> list[DeadLetter]:
        deadline = time.monotonic() + timeout
        while True:
            letters = await read_dead_letters(
                self.kafka,
                [self.topic + ".dlq"],
                selection=DeadLetterSelection(saga_id=saga_id),
            )
            if letters:
                return letters
            assert time.monotonic() < deadline, f"no dead letter for {saga_id}"
            await asyncio.sleep(0.2)

    async def undone(self, service: str, saga_id: str) -> list[str]:
        async with self.engines[service].connect() as conn:
            rows = await conn.execute(
                sa.select(self.log.c.entry).where(self.log.c.saga_id == saga_id)
            )
            return list(rows.scalars())


@pytest.fixture
async def harness(tmp_path: Path, kafka_settings: KafkaSettings) -> AsyncIterator[Harness]:
    prefix = f"f{uuid.uuid4().hex[:8]}."
    await ensure_topics(kafka_settings, {prefix + SAGA: 2, prefix + SAGA + ".dlq": 1})
    codec = core_codec()
    settings = ServiceSettings(
        saga_topic_prefix=prefix,
        group_prefix=prefix,
        relay=RelaySettings(poll_interval=timedelta(milliseconds=200)),
        retry=RetryPolicy(initial_interval=timedelta(milliseconds=20), maximum_attempts=3),
    )
    names = ("starter", "alpha", "beta", "gamma")
    engines = {n: create_engine(f"sqlite+aiosqlite:///{tmp_path / n}.db") for n in names}
    services: dict[str, Service] = {}
    log_tables: dict[str, sa.Table] = {}
    ended_tables: dict[str, sa.Table] = {}
    for name in names:
        metadata = sa.MetaData()
        log_tables[name] = sa.Table(
            "undo_log",
            metadata,
            sa.Column("saga_id", sa.String(100)),
            sa.Column("entry", sa.String(100)),
        )
        ended_tables[name] = sa.Table(
            "ended",
            metadata,
            sa.Column("saga_id", sa.String(100)),
            sa.Column("status", sa.String(20)),
        )
        services[name] = Service(
            name,
            engine=engines[name],
            kafka=kafka_settings,
            codec=codec,
            settings=settings,
            tables=OutboxTables(metadata),
        )
        async with engines[name].begin() as conn:
            await conn.run_sync(metadata.create_all)
        await services[name].create_tables()
    log, ended = log_tables["alpha"], ended_tables["starter"]
    attempts: dict[str, int] = {}

    def count(what: str) -> None:
        attempts[what] = attempts.get(what, 0) + 1

    async def note(ctx: SagaContext, entry: str) -> None:
        await ctx.session.execute(sa.insert(log).values(saga_id=ctx.saga_id, entry=entry))

    @services["starter"].on_saga_end(SAGA)
    async def on_end(ctx: SagaContext) -> None:
        await ctx.session.execute(
            sa.insert(ended).values(saga_id=ctx.saga_id, status=ctx.stamp.status.value)
        )

    @services["alpha"].step("alpha", saga=SAGA, on=STARTED)
    async def alpha(ctx: SagaContext) -> None:
        ctx.emit(ALPHA_DONE, {"n": ctx.data["n"]})

    @services["alpha"].compensation("alpha", saga=SAGA)
    async def undo_alpha(ctx: SagaContext) -> None:
        await note(ctx, "alpha undone")

    @services["beta"].step("beta", saga=SAGA, on=ALPHA_DONE)
    async def beta(ctx: SagaContext) -> None:
        if ctx.data["n"] == BETA_STALLS:
            ctx.schedule(STARTED, {"n": 0}, delay=timedelta(hours=1))
        elif ctx.data["n"] != BETA_SILENT:
            ctx.emit(BETA_DONE, {"n": ctx.data["n"]})

    @services["beta"].compensation("beta", saga=SAGA)
    async def undo_beta(ctx: SagaContext) -> None:
        count(f"undo beta {ctx.saga_id}")
        if ctx.saga_id.startswith(f"saga-{BETA_UNDO_BREAKS}-"):
            raise RuntimeError("the refund gateway is gone for good")
        if (
            ctx.saga_id.startswith(f"saga-{BETA_UNDO_FLAKY}-")
            and attempts[f"undo beta {ctx.saga_id}"] < 3
        ):
            raise Flaky("connection reset")
        await note(ctx, "beta undone")

    @services["gamma"].step("gamma", saga=SAGA, on=BETA_DONE)
    async def gamma(ctx: SagaContext) -> None:
        count(f"gamma {ctx.saga_id}")
        if ctx.data["n"] == GAMMA_CRASHES:
            raise ZeroDivisionError("a bug in gamma")
        if ctx.data["n"] == GAMMA_ALWAYS_FLAKY:
            raise Flaky("the warehouse API times out, again")
        ctx.fail("gamma refuses")

    for service in services.values():
        await service.start()
    await asyncio.gather(*(s.wait_assigned() for s in services.values()))
    harness = Harness(
        services=services,
        engines=engines,
        log=log,
        ended=ended,
        attempts=attempts,
        kafka=kafka_settings,
        topic=prefix + SAGA,
    )
    try:
        yield harness
    finally:
        for service in services.values():
            await service.stop()
        for engine in engines.values():
            await engine.dispose()


async def test_business_failure_compensates_in_reverse_order(harness: Harness) -> None:
    saga_id = await harness.start(GAMMA_REFUSES)

    assert await harness.ended_as(saga_id) == "COMPENSATED"
    stamp = await harness.services["starter"].saga_state(saga_id)
    assert stamp is not None
    assert [(s.name, s.outcome) for s in stamp.steps] == [
        ("alpha", StepOutcome.DONE),
        ("beta", StepOutcome.DONE),
        ("gamma", StepOutcome.FAILED),
        ("beta", StepOutcome.COMPENSATED),
        ("alpha", StepOutcome.COMPENSATED),
    ]
    assert stamp.reason == "gamma refuses"
    assert await harness.undone("beta", saga_id) == ["beta undone"]
    assert await harness.undone("alpha", saga_id) == ["alpha undone"]


async def test_compensation_that_keeps_failing_suspends_the_saga_at_that_compensation(
    harness: Harness,
) -> None:
    """A compensation that raises is a bug: retried, dead-lettered, the saga suspended there.

    It is never recorded as done, and the chain does not skip it: the other
    compensations wait until the fixed handler is replayed.
    """
    saga_id = await harness.start(BETA_UNDO_BREAKS)

    stamp = await harness.suspended("beta", saga_id)
    assert not stamp.status.is_terminal
    suspension = stamp.suspension
    assert suspension is not None
    assert (suspension.role, suspension.step, suspension.attempts) == ("compensation", "beta", 3)
    assert "refund gateway is gone" in suspension.error
    (letter,) = await harness.dead_letters(saga_id)
    assert letter.info["role"] == "compensation"
    assert letter.header("ce_type") == "choreosaga.saga.Compensate"
    assert harness.attempts[f"undo beta {saga_id}"] == 3  # the policy's attempts
    assert await harness.undone("alpha", saga_id) == []  # alpha waits behind beta


async def test_transient_compensation_failure_is_retried(harness: Harness) -> None:
    saga_id = await harness.start(BETA_UNDO_FLAKY)

    assert await harness.ended_as(saga_id) == "COMPENSATED"
    assert harness.attempts[f"undo beta {saga_id}"] == 3
    assert await harness.undone("beta", saga_id) == ["beta undone"]


async def test_step_that_crashes_suspends_the_saga_instead_of_compensating_it(
    harness: Harness,
) -> None:
    saga_id = await harness.start(GAMMA_CRASHES)

    stamp = await harness.suspended("gamma", saga_id)
    assert stamp.status is SagaStatus.RUNNING
    assert stamp.suspension is not None
    assert "ZeroDivisionError" in stamp.suspension.error
    assert not [s for s in stamp.steps if s.name == "gamma"]  # not recorded as failed
    (letter,) = await harness.dead_letters(saga_id)
    assert letter.error_type == "builtins.ZeroDivisionError"
    assert harness.attempts[f"gamma {saga_id}"] == 3  # retried per policy, then stopped
    assert await harness.undone("alpha", saga_id) == []  # nothing compensated

    # Traced from gamma's own database, the saga says where it is suspended and why.
    suspension = stamp.suspension
    assert suspension is not None
    at = suspension.at.astimezone(UTC).isoformat(timespec="milliseconds")
    # While gamma runs: the trace reads gamma's SQLite database without its write lock.
    database = harness.engines["gamma"].url.database
    traced = subprocess.run(
        [sys.executable, "-m", "saga", "trace", saga_id, "--database-url", f"sqlite:///{database}"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert traced.returncode == 0, traced.stderr
    assert "from the service database" in traced.stdout
    assert re.search(
        rf"^{at[11:23]} .* gamma .*suspended: ZeroDivisionError: a bug in gamma.* gamma "
        r"+DEAD_LETTERED$",
        traced.stdout,
        re.MULTILINE,
    ), traced.stdout
    explanation = (
        "RUNNING, suspended at gamma step gamma: ZeroDivisionError: a bug in gamma; "
        f"waiting {{}}s since the suspension at {at}"
    )
    assert re.search(re.escape(explanation).replace(r"\{\}", r"[\d.]+"), traced.stdout), (
        traced.stdout
    )
    started = stamp.started_at.astimezone(UTC).isoformat(timespec="milliseconds")
    assert f"started {started}" in traced.stdout  # the start's own time
    # The same in the JSON form, for a program.
    trace = await trace_from_service(harness.engines["gamma"], core_codec(), saga_id)
    assert trace is not None
    held = trace.to_dict()["suspension"]
    assert (held["service"], held["step"], held["at"]) == ("gamma", "gamma", at)
    assert held["error"] == "ZeroDivisionError: a bug in gamma"


async def test_step_that_emits_nothing_is_a_bug_and_suspends_the_saga(harness: Harness) -> None:
    saga_id = await harness.start(BETA_SILENT)

    stamp = await harness.suspended("beta", saga_id)
    assert stamp.suspension is not None
    assert "neither emitted" in stamp.suspension.error
    assert await harness.undone("alpha", saga_id) == []


async def test_a_stalled_saga_is_detected(harness: Harness) -> None:
    saga_id = await harness.start(BETA_STALLS)
    starter = harness.services["starter"]

    async def listed() -> bool:
        stuck = await starter.stuck_sagas(older_than=timedelta(milliseconds=300))
        return saga_id in {s.saga_id for s in stuck}

    deadline = time.monotonic() + 20
    while not await listed():
        assert time.monotonic() < deadline, "the stalled saga was never reported"
        await asyncio.sleep(0.1)
    stamp = await starter.saga_state(saga_id)
    assert stamp is not None
    assert stamp.status is SagaStatus.RUNNING
    assert [s.name for s in stamp.steps] == ["alpha"]
    finished = await harness.start(GAMMA_REFUSES)
    assert await harness.ended_as(finished) == "COMPENSATED"
    stuck = await starter.stuck_sagas(older_than=timedelta(0))
    assert finished not in {s.saga_id for s in stuck}


async def test_retriable_error_that_never_clears_is_dead_lettered_and_unblocks(
    harness: Harness,
) -> None:
    stuck = await harness.start(GAMMA_ALWAYS_FLAKY)
    behind = await harness.start(GAMMA_REFUSES)  # later saga, possibly same partition

    assert await harness.ended_as(behind) == "COMPENSATED"
    (letter,) = await harness.dead_letters(stuck)
    assert letter.error_type.endswith("Flaky")
    assert harness.attempts[f"gamma {stuck}"] == 3  # the policy's attempts, then give up
    stamp = await harness.suspended("gamma", stuck)
    assert stamp.suspension is not None
    assert "Flaky" in stamp.suspension.error
