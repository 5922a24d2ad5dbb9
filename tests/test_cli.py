"""The ``saga`` command: exit codes and messages a user (or CI) relies on."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import MetaData

from outbox import OutboxMessage, OutboxTables, SqlOutboxStore, create_engine
from outbox.tables import create_tables
from saga import AvroCodec, SagaStatus, SchemaRegistry, Stamp, StepOutcome, StepRecord
from saga.envelope import Envelope
from saga.observe.log import SagaLog
from saga.observe.message import observe_envelope
from saga.state import SagaStates, SagaView

if TYPE_CHECKING:
    from saga.observe.message import ObservedMessage

SCHEMAS = Path(__file__).parent / "schemas"


def saga(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "saga", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def refused(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run ``saga ARGS`` in this process, refused before anything starts (by argparse,
    or as a usage error): the status must be 2; return what it wrote on stderr."""
    from saga.cli import main

    kafka_log = logging.getLogger("aiokafka")
    level = kafka_log.level  # main() quiets aiokafka: not for the tests after this one
    try:
        status = main(list(args))
    except SystemExit as exited:
        status = exited.code  # type: ignore[assignment]
    finally:
        kafka_log.setLevel(level)
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    return err


def test_schemas_check_passes_on_the_project_schemas() -> None:
    result = saga("schemas", "check", str(SCHEMAS.parent.parent / "schemas"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every version reads the earlier ones" in result.stdout


def test_schemas_check_without_a_directory_says_so(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "saga", "schemas", "check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "no schemas directory" in result.stderr


def test_schemas_check_fails_where_there_is_nothing_to_check(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("schemas go here")
    result = saga("schemas", "check", str(tmp_path))
    assert result.returncode == 2
    assert "no .avsc files" in result.stderr
    assert "Traceback" not in result.stderr


def test_schemas_check_fails_on_an_incompatible_change() -> None:
    result = saga("schemas", "check", str(SCHEMAS / "broken"))
    assert result.returncode == 1
    assert "new field 'language' has no default" in result.stdout
    assert "int cannot read string" in result.stdout
    assert "recursive schemas are refused" in result.stdout


def test_schemas_check_full_also_checks_old_readers(tmp_path: Path) -> None:
    backward_only = saga("schemas", "check", str(SCHEMAS / "evolution"))
    full = saga("schemas", "check", "--full", str(SCHEMAS / "evolution"))
    assert backward_only.returncode == 0, backward_only.stdout
    assert "(--full)" not in backward_only.stdout
    assert full.returncode == 1
    project = saga("schemas", "check", "--full", str(SCHEMAS.parent.parent / "schemas"))
    assert "every version reads the earlier ones and is read by them" in project.stdout
    assert "int cannot read long" in full.stdout


def test_relay_without_a_database_is_refused_clearly() -> None:
    result = saga("relay", env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "DATABASE_URL" in result.stderr


def test_relay_refuses_sasl_plain_without_tls() -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "KAFKA_SASL_MECHANISM": "PLAIN",
        "KAFKA_SASL_USERNAME": "shop",
        "KAFKA_SASL_PASSWORD": "hunter2",
    }
    result = saga("relay", "--database-url", "sqlite:////nonexistent/x.db", env=env)
    assert result.returncode == 2
    assert "SASL PLAIN" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--retention", "nan"),
        ("--lease-ttl", "inf"),
        ("--poll-interval", "-1"),
        ("--retention", "1e300"),
    ],
)
def test_relay_refuses_durations_that_are_no_number_of_seconds(
    option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """One line naming the option, not a traceback from converting NaN or 1e300 seconds."""
    err = refused(capsys, "relay", "--database-url", "sqlite:////nonexistent/x.db", option, value)
    assert f"argument {option}: '{value}' is not a number of seconds" in err


@pytest.mark.parametrize(
    ("command", "option", "value", "says"),
    [
        ("relay", "--lease-ttl", "0.5", "'0.5' is not a number of seconds from 1 to"),
        ("relay", "--poll-interval", "1e-7", "'1e-7' seconds is shorter than a microsecond"),
        ("relay", "--startup-timeout", "1e-9", "'1e-9' seconds is shorter than a microsecond"),
        ("relay", "--batch-size", "0", "'0' is not a whole number from 1 to 10000"),
        ("relay", "--batch-size", str(2**63), f"'{2**63}' is not a whole number from 1 to 10000"),
        ("relay", "--shards", "0", "'0' is not a whole number from 1 to 4096"),
        ("relay", "--shards", "4097", "'4097' is not a whole number from 1 to 4096"),
        ("relay", "--outbox-table", "Orders", "outbox table name 'Orders' is not allowed"),
        ("relay", "--name", "r" * 201, "a relay name is at most 200 characters, not 201"),
        ("relay", "--bootstrap-servers", " ", "' ' names no broker"),
        ("outbox", "--outbox-table", "Orders", "outbox table name 'Orders' is not allowed"),
        ("relay", "--outbox-table", "inbox", "'inbox' is the name of another table of the outbox"),
    ],
)
def test_relay_options_are_refused_under_their_own_name(
    command: str, option: str, value: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A value the relay's settings would refuse is a usage error naming the option the
    user typed, before anything is opened; not the setting behind it (lease_ttl)."""
    action = ["stats"] if command == "outbox" else []
    err = refused(
        capsys,
        command,
        *action,
        "--database-url",
        "sqlite:////nonexistent/x.db",
        f"{option}={value}",
    )
    assert f"argument {option}: {says}" in err
    for setting in ("lease_ttl", "poll_interval", "startup_timeout", "batch_size", "timedelta"):
        assert setting not in err
    assert "bootstrap_servers" not in err


@pytest.mark.parametrize(
    ("command", "option", "value", "unit"),
    [
        ("observe", "--retention-days", "nan", "days"),
        ("observe", "--retention-days", "inf", "days"),
        ("observe", "--retention-days", "-1", "days"),
        ("observe", "--retention-days", "0", "days"),  # would forget every saga at once
        ("observe", "--retention-days", "3651", "days"),  # more than ten years
        ("status", "--stuck-after", "nan", "seconds"),
        ("status", "--stuck-after", "inf", "seconds"),
        ("status", "--stuck-after", "-inf", "seconds"),
        ("status", "--stuck-after", "-5", "seconds"),
        ("status", "--stuck-after", "1e300", "seconds"),
    ],
)
def test_saga_log_commands_refuse_durations_that_are_no_duration(
    tmp_path: Path,
    command: str,
    option: str,
    value: str,
    unit: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A usage error naming the option, before the saga log is opened (or created)."""
    log = tmp_path / "log.db"
    # option=value: argparse would take a lone "-inf" for an option.
    err = refused(capsys, command, "--database-url", f"sqlite:///{log}", f"{option}={value}")
    assert f"argument {option}: '{value}' is not a number of {unit}" in err
    assert not log.exists()


def test_status_still_takes_zero_seconds_to_list_every_running_saga(tmp_path: Path) -> None:
    """--stuck-after 0 is a duration (every running saga is stuck): it gets to the log."""
    result = saga(
        "status", "--database-url", f"sqlite:///{tmp_path / 'none.db'}", "--stuck-after=0"
    )
    assert result.returncode == 2, result.stderr  # a usage error, as for saga outbox
    assert "saga status: no SQLite database at" in result.stderr


@pytest.mark.parametrize("value", ["nan", "-1", "1e300"])
def test_place_orders_refuses_pauses_that_are_no_number_of_seconds(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The shop's --every takes the same durations as saga's own options, before any database."""
    from services.run import main

    with pytest.raises(SystemExit) as exited:
        # No DATABASE_URL: the value must be refused before the environment is read.
        main(["place-orders", f"--every={value}"], environ={})
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --every: '{value}' is not a number of seconds" in err
    assert "Traceback" not in err


def test_demo_refuses_nonsense_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--orders" in refused(capsys, "demo", "--orders", "0")


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--deadline", "nan"),
        ("--deadline", "inf"),
        ("--deadline", "0"),
        ("--timeout", "nan"),
        ("--timeout", "-1"),
        ("--timeout", "1e300"),
    ],
)
def test_demo_refuses_durations_that_are_no_number_of_seconds(
    option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before a broker or a database is started, naming the option."""
    err = refused(capsys, "demo", f"{option}={value}")
    assert f"argument {option}: '{value}' is not a number of seconds" in err


def test_outbox_commands_list_and_release_parked_rows(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'service.db'}"

    async def park_one() -> str:
        engine = create_engine(url)
        tables = OutboxTables()
        await tables.create_all(engine)
        store = SqlOutboxStore(engine, tables)
        async with engine.begin() as conn:
            await store.add(conn, [OutboxMessage(topic="orders", key=b"k", value=b"x" * 10)])
        (row,) = await store.fetch_due(set(range(store.shards)), 10)
        await store.record_failure(row, "record too large for the broker", park=True)
        await engine.dispose()
        return row.message_id

    message_id = asyncio.run(park_one())

    listed = saga("outbox", "parked", "--database-url", url)
    assert listed.returncode == 0, listed.stderr
    assert message_id in listed.stdout
    assert "record too large for the broker" in listed.stdout
    assert "parked 1" in saga("outbox", "stats", "--database-url", url).stdout

    released = saga("outbox", "retry", message_id, "--database-url", url)
    assert released.stdout.strip() == "released 1 parked row(s) for another try"
    assert (
        "pending 1, scheduled 0, parked 0" in saga("outbox", "stats", "--database-url", url).stdout
    )


def _ending_of(kind: str, when: datetime) -> list[ObservedMessage]:
    """The messages of a saga that reserved stock, then was compensated: on an abort
    request, or on its deadline (with an abort request arriving once it compensates)."""
    from dataclasses import replace

    from saga.choreography import ABORT_REQUESTED, COMPENSATE, DEADLINE_REACHED, SAGA_ENDED
    from saga.observe.message import ObservedMessage, stamp_to_json
    from saga.stamp import SagaStatus, Stamp, StepOutcome, StepRecord

    saga_id = f"order-{kind}"
    started = Stamp(
        saga_name="place_order",
        saga_id=saga_id,
        status=SagaStatus.RUNNING,
        correlation_id=saga_id,
        started_at=when,
    )
    reserved = replace(
        started.with_step(
            StepRecord(name="reserve_stock", service="inventory", outcome=StepOutcome.DONE, at=when)
        ),
        hop=1,
    )
    reason = "customer cancelled" if kind == "aborted" else "deadline passed"
    compensating = replace(reserved.with_status(SagaStatus.COMPENSATING, reason), hop=3)
    ended = replace(
        compensating.with_step(
            StepRecord(
                name="reserve_stock", service="inventory", outcome=StepOutcome.COMPENSATED, at=when
            )
        ).with_status(SagaStatus.COMPENSATED),
        hop=4,
    )
    trigger = (ABORT_REQUESTED, "saga-abort") if kind == "aborted" else (DEADLINE_REACHED, "order")
    story = [
        ("placed", "shop.OrderPlaced", "order", started, None, None, None),
        (
            "reserved",
            "shop.StockReserved",
            "inventory",
            reserved,
            "placed",
            "reserve_stock",
            "DONE",
        ),
        ("trigger", *trigger, replace(reserved, hop=2), None, None, None),
        ("undo", COMPENSATE, "order", compensating, "trigger", None, None),
        ("ended", SAGA_ENDED, "inventory", ended, "undo", "reserve_stock", "COMPENSATED"),
    ]
    if kind == "deadline":  # too late to change anything: the saga already compensates
        story.insert(4, ("late", ABORT_REQUESTED, "saga-abort", compensating, None, None, None))
    return [
        ObservedMessage(
            message_id=f"{saga_id}-{name}",
            saga_name="place_order",
            saga_id=saga_id,
            event_type=event_type,
            source=f"/choreosaga/{service}",
            service=service,
            step=step,
            outcome=outcome,
            status=stamp.status.value,
            reason=stamp.reason,
            hop=stamp.hop,
            time=when + timedelta(milliseconds=10 * offset),
            causation_id=None if cause is None else f"{saga_id}-{cause}",
            correlation_id=saga_id,
            trace_id=None,
            detail=None,
            stamp=stamp_to_json(stamp),
            topic="saga.place_order",
            partition=0,
            offset=offset,
        )
        for offset, (name, event_type, service, stamp, cause, step, outcome) in enumerate(story)
    ]


def test_trace_of_an_aborted_saga_says_it_was_aborted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`saga abort --reason "customer cancelled"`: the trace ends on why, in the words of
    the other endings; a deadline's ending keeps its own (and a late abort changes nothing)."""
    import asyncio

    from saga import create_engine
    from saga.cli import main
    from saga.observe.log import SagaLog

    url = f"sqlite:///{tmp_path / 'saga_log.db'}"

    async def fill() -> None:
        engine = create_engine(url)
        log = SagaLog(dialect="sqlite")
        try:
            await log.create_tables(engine)
            async with engine.begin() as conn:
                for kind in ("aborted", "deadline"):
                    for message in _ending_of(kind, datetime.now(UTC)):
                        await log.record(conn, message)
        finally:
            await engine.dispose()

    asyncio.run(fill())
    endings = {
        "aborted": "COMPENSATED: aborted: customer cancelled",
        "deadline": "COMPENSATED: compensation began: deadline passed",
    }
    for kind, ending in endings.items():
        capsys.readouterr()
        assert main(["trace", f"order-{kind}", "--database-url", url]) == 0
        assert ending in capsys.readouterr().out.splitlines()


async def _park_a_row_and_save_a_saga(service_url: str, log_url: str) -> str:
    """A service's database (a parked outbox row, the view of saga order-1) and a saga log
    holding order-1's first message; return the parked row's message id."""
    started = datetime(2026, 1, 1, tzinfo=UTC)
    stamp = Stamp(
        saga_name="place_order",
        saga_id="order-1",
        status=SagaStatus.RUNNING,
        correlation_id="corr-1",
        started_at=started,
        steps=(
            StepRecord(
                name="reserve_stock", service="inventory", outcome=StepOutcome.DONE, at=started
            ),
        ),
    )
    engine = create_engine(service_url)
    try:
        tables = OutboxTables()
        states = SagaStates(
            MetaData(), AvroCodec(SchemaRegistry.default()), dialect=engine.dialect.name
        )
        await create_tables(engine, [tables.outbox, tables.inbox, tables.leases, tables.relays])
        await create_tables(engine, [states.table])
        store = SqlOutboxStore(engine, tables)
        async with engine.begin() as conn:
            await store.add(conn, [OutboxMessage(topic="orders", key=b"k", value=b"x")])
            await states.save(conn, SagaView(stamp=stamp))
        (row,) = await store.fetch_due(set(range(store.shards)), 10)
        await store.record_failure(row, "record too large for the broker", park=True)
    finally:
        await engine.dispose()
    engine = create_engine(log_url)
    try:
        log = SagaLog(dialect=engine.dialect.name)
        await log.create_tables(engine)
        placed = Envelope(
            type="shop.OrderPlaced",
            data={},
            source="/choreosaga/order",
            key=b"order-1",
            time=started,
            correlation_id="corr-1",
            stamp=stamp,
        )
        observed = observe_envelope(placed, topic="saga.place_order", partition=0, offset=0)
        assert observed is not None
        async with engine.begin() as conn:
            await log.record(conn, observed)
    finally:
        await engine.dispose()
    return row.message_id


@contextmanager
def write_lock(path: Path, statement: str) -> Iterator[sqlite3.Connection]:
    """Hold the write lock of the SQLite database at ``path``, as a running service's
    transaction does, with ``statement`` run but not committed."""
    writer = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute(statement)
        yield writer
    finally:
        writer.close()


def test_read_commands_read_a_sqlite_database_while_a_service_is_writing_to_it(
    tmp_path: Path,
) -> None:
    """saga trace, status, outbox stats and parked only read: on a SQLite database whose
    write lock a running service holds (a long handler transaction), they show what is
    committed (not the deletions under way), instead of waiting for the lock and failing
    with "database is locked"; and the service then commits its transaction."""
    service_db, log_db = tmp_path / "order.db", tmp_path / "saga_log.db"
    service_url, log_url = f"sqlite:///{service_db}", f"sqlite:///{log_db}"
    message_id = asyncio.run(_park_a_row_and_save_a_saga(service_url, log_url))

    with (
        write_lock(service_db, "DELETE FROM saga_state") as service,
        write_lock(log_db, "DELETE FROM saga_log_sagas") as observer,
    ):
        from_service = saga("trace", "order-1", "--database-url", service_url)
        assert from_service.returncode == 0, from_service.stderr
        assert "from the service database" in from_service.stdout
        assert "reserve_stock" in from_service.stdout
        assert "RUNNING" in from_service.stdout

        from_log = saga("trace", "order-1", "--database-url", log_url)
        assert from_log.returncode == 0, from_log.stderr
        assert "from the saga log" in from_log.stdout
        assert "OrderPlaced from order" in from_log.stdout

        status = saga("status", "--database-url", log_url)
        assert status.returncode == 0, status.stderr
        assert "place_order          RUNNING             1" in status.stdout

        stats = saga("outbox", "stats", "--database-url", service_url)
        assert stats.returncode == 0, stats.stderr
        assert "parked 1" in stats.stdout
        parked = saga("outbox", "parked", "--database-url", service_url)
        assert parked.returncode == 0, parked.stderr
        assert message_id in parked.stdout

        service.execute("COMMIT")
        observer.execute("COMMIT")
        assert service.execute("SELECT count(*) FROM saga_state").fetchone() == (0,)
        assert observer.execute("SELECT count(*) FROM saga_log_sagas").fetchone() == (0,)


def test_an_aborted_saga_is_said_aborted_whatever_the_participants_clock() -> None:
    """The inventory service's clock runs 15 ms behind the order service's: its
    SagaEnded, caused by the initiator's Compensate, bears an earlier time than that
    Compensate. The saga was still turned back by `saga abort`, and its trace says so."""
    from dataclasses import replace

    from saga.observe.trace import build_trace

    when = datetime.now(UTC)
    behind = timedelta(milliseconds=15)
    messages = [
        replace(m, time=m.time - behind) if m.service == "inventory" else m
        for m in _ending_of("aborted", when)
    ]
    trace = build_trace(messages)
    assert trace is not None
    assert trace.aborted
    assert trace.explanation() == "COMPENSATED: aborted: customer cancelled"


def _order_7(saga_name: str, ended: SagaStatus, deadline: timedelta) -> list[ObservedMessage]:
    """Saga ``saga_name`` with the id ``order-7`` (correlation ``corr-<saga_name>``): its
    first message and its end, with status ``ended``."""
    from dataclasses import replace

    from saga.choreography import SAGA_ENDED
    from saga.observe.message import ObservedMessage, stamp_to_json

    when = datetime.now(UTC).replace(microsecond=0)
    started = Stamp(
        saga_name=saga_name,
        saga_id="order-7",
        status=SagaStatus.RUNNING,
        correlation_id=f"corr-{saga_name}",
        started_at=when,
        deadline=when + deadline,
    )
    story = [
        ("started", "shop.OrderEvent", started),
        ("ended", SAGA_ENDED, replace(started.with_status(ended), hop=1)),
    ]
    return [
        ObservedMessage(
            message_id=f"{saga_name}-{name}",
            saga_name=saga_name,
            saga_id="order-7",
            event_type=event_type,
            source="/choreosaga/order",
            service="order",
            step=None,
            outcome=None,
            status=stamp.status.value,
            reason=stamp.reason,
            hop=stamp.hop,
            time=when + timedelta(milliseconds=10 * stamp.hop),
            causation_id=None,
            correlation_id=stamp.correlation_id,
            trace_id=None,
            detail=None,
            stamp=stamp_to_json(stamp),
            topic=f"saga.{saga_name}",
            partition=0,
            offset=stamp.hop,
        )
        for name, event_type, stamp in story
    ]


def test_trace_status_and_abort_tell_two_sagas_sharing_an_id_apart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """place_order and cancel_order of order 7 both use the id order-7. 'saga trace
    order-7' does not mix their messages: it asks which saga is meant, as 'saga abort'
    does, and traces the one named with --saga (or by its correlation id); 'saga status'
    counts both."""
    import json

    from saga import create_engine
    from saga.cli import main

    url = f"sqlite:///{tmp_path / 'saga_log.db'}"
    place = _order_7("place_order", SagaStatus.COMPLETED, timedelta(minutes=5))
    cancel = _order_7("cancel_order", SagaStatus.COMPENSATED, timedelta(days=3))

    async def fill() -> None:
        engine = create_engine(url)
        log = SagaLog(dialect="sqlite")
        try:
            await log.create_tables(engine)
            async with engine.begin() as conn:
                for message in place + cancel:
                    await log.record(conn, message)
        finally:
            await engine.dispose()

    asyncio.run(fill())
    for args in (
        ["trace", "order-7"],
        ["abort", "order-7", "--reason", "r", "--bootstrap-servers", "127.0.0.1:1"],
    ):
        err = refused(capsys, *args, "--database-url", url)
        assert "sagas of several names have id 'order-7' (cancel_order, place_order)" in err
        assert "--saga" in err
    for ref, name, messages in (
        (["order-7", "--saga", "place_order"], "place_order", place),
        (["order-7", "--saga", "cancel_order"], "cancel_order", cancel),
        (["corr-cancel_order"], "cancel_order", cancel),
    ):
        assert main(["trace", *ref, "--format", "json", "--database-url", url]) == 0
        trace = json.loads(capsys.readouterr().out)
        assert trace["saga_name"] == name
        assert [e["message_id"] for e in trace["timeline"]] == [m.message_id for m in messages]
    assert main(["status", "--json", "--database-url", url]) == 0
    counts = json.loads(capsys.readouterr().out)["counts"]
    assert counts == {"cancel_order": {"COMPENSATED": 1}, "place_order": {"COMPLETED": 1}}
    assert main(["abort", "order-7", "--saga", "place_order", "--reason", "r",
                 "--database-url", url, "--bootstrap-servers", "127.0.0.1:1"]) == 0  # fmt: skip
    assert "saga order-7 already ended COMPLETED" in capsys.readouterr().out


def test_trace_from_a_service_database_tells_two_sagas_sharing_an_id_apart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A service's own views of place_order and cancel_order of order 7: 'saga trace
    order-7' asks which one is meant, and traces the one named with --saga."""
    from saga.cli import main

    url = f"sqlite:///{tmp_path / 'order.db'}"
    when = datetime.now(UTC)

    async def save() -> None:
        engine = create_engine(url)
        states = SagaStates(MetaData(), AvroCodec(SchemaRegistry.default()), dialect="sqlite")
        try:
            await create_tables(engine, [states.table])
            async with engine.begin() as conn:
                for name, status in (
                    ("place_order", SagaStatus.COMPLETED),
                    ("cancel_order", SagaStatus.COMPENSATED),
                ):
                    stamp = Stamp(
                        saga_name=name,
                        saga_id="order-7",
                        status=status,
                        correlation_id=f"corr-{name}",
                        started_at=when,
                    )
                    await states.save(conn, SagaView(stamp=stamp))
        finally:
            await engine.dispose()

    asyncio.run(save())
    err = refused(capsys, "trace", "order-7", "--database-url", url)
    assert "sagas of several names have id 'order-7' (cancel_order, place_order)" in err
    assert "--saga" in err
    assert main(["trace", "order-7", "--saga", "cancel_order", "--database-url", url]) == 0
    out = capsys.readouterr().out
    assert "saga cancel_order order-7" in out
    assert "from the service database" in out
    assert "COMPENSATED" in out
