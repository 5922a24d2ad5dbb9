"""Bad input to the ``saga`` command: one line on stderr, the right exit status, no traceback.

Each command runs as a real process, as a user would type it: exit 2 for a
usage error, 1 for a runtime failure (a server that does not answer, a
directory that cannot be made). The demo never drops a database it did not
create.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

from tests.conftest import DEFAULT_POSTGRES_URL

SERVER = make_url(os.environ.get("TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)).set(
    drivername="postgresql"
)


def saga(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "saga", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_one_line(result: subprocess.CompletedProcess[str], status: int, *needles: str) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.returncode == status, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("args", "status", "needle"),
    [
        (["demo", "--database-url", "notaurl"], 2, "not a database URL"),
        (["demo", "--database-url", "mysql://shop@127.0.0.1/shop"], 2, "must be a PostgreSQL URL"),
        (
            ["demo", "--database-url", SERVER._replace(database=None).render_as_string()],
            2,
            "names no",
        ),
        (["demo", "--database-url", "postgresql://postgres@127.0.0.1:1/x"], 1, "refused"),
        (["outbox", "stats", "--database-url", "notaurl"], 2, "not a database URL"),
        (["outbox", "retry", "--database-url", "postgresql://u@127.0.0.1:1/x"], 1, "refused"),
    ],
    ids=["not-a-url", "mysql", "no-database", "unreachable-postgres", "outbox-url", "outbox-down"],
)
def test_bad_database_urls_get_one_line(
    args: list[str], status: int, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    got, err = run_main(capsys, *args)
    assert_one_error_line(got, err, status, f"saga {args[0]}: ", needle)


def test_demo_with_an_unknown_role_says_so() -> None:
    role = f"nobody_{uuid.uuid4().hex[:8]}"
    url = SERVER.set(username=role, database="demo").render_as_string(hide_password=False)
    assert_one_line(saga("demo", "--database-url", url), 1, f'role "{role}" does not exist')


def test_demo_with_an_unreachable_broker_says_so() -> None:
    result = saga("demo", "--orders", "2", "--bootstrap-servers", "127.0.0.1:1")
    assert_one_line(result, 1, "saga demo: ", "127.0.0.1")


def test_demo_directory_under_a_file_says_so(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    result = saga("demo", "--orders", "2", "--directory", str(tmp_path / "file" / "demo"))
    assert_one_line(result, 1, "Not a directory", str(tmp_path / "file"))
    result = saga("demo", "--orders", "2", "--directory", str(tmp_path / "file"))
    assert_one_line(result, 2, f"--directory {tmp_path / 'file'} is a file, not a directory")


def test_verbose_keeps_the_traceback() -> None:
    result = saga("-v", "outbox", "stats", "--database-url", "postgresql://u@127.0.0.1:1/x")
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("saga outbox: ")
    after = saga("outbox", "stats", "-v", "--database-url", "postgresql://u@127.0.0.1:1/x")
    assert "Traceback" in after.stderr


def test_version_names_the_installed_release() -> None:
    from importlib.metadata import version

    result = saga("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"saga {version('choreosaga')}"


def test_help_shows_the_defaults() -> None:
    relay = saga("relay", "--help").stdout
    assert "(default: 500)" in " ".join(relay.split())  # --batch-size
    assert "(default: 16)" in relay  # --shards
    demo = " ".join(saga("demo", "--help").stdout.split())
    assert "(default: 120.0)" in demo  # --timeout


async def _outbox_with_a_parked_and_a_pending_row(url: str) -> tuple[str, str]:
    """Message ids of a parked row and of a row waiting to be published."""
    from outbox import OutboxMessage, OutboxTables, SqlOutboxStore, create_engine

    engine = create_engine(url)
    try:
        tables = OutboxTables()
        await tables.create_all(engine)
        store = SqlOutboxStore(engine, tables)
        async with engine.begin() as conn:
            await store.add(conn, [OutboxMessage(topic="orders", key=b"a", value=b"x")])
        (row,) = await store.fetch_due(set(range(store.shards)), 10)
        await store.record_failure(row, "record too large for the broker", park=True)
        async with engine.begin() as conn:
            await store.add(conn, [OutboxMessage(topic="orders", key=b"b", value=b"y")])
        (pending,) = await store.fetch_due(set(range(store.shards)), 10)
    finally:
        await engine.dispose()
    return row.message_id, pending.message_id


def test_outbox_retry_of_a_row_that_is_not_parked_says_only_that(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing released: the error alone, exit 1, no "released 0" beside it. Ids that are
    parked are still released when others are not (and the status is still 1)."""
    url = f"sqlite:///{tmp_path / 'service.db'}"
    parked, pending = asyncio.run(_outbox_with_a_parked_and_a_pending_row(url))
    for ids in ([pending], [pending, "123"]):
        for action in (["retry"], ["discard", "--yes"]):
            status, out, err = run_main_output(
                capsys, "outbox", *action, *ids, "--database-url", url
            )
            assert out == "", out
            assert status == 1, err
            assert err.splitlines() == [f"saga outbox: no parked row {i}" for i in ids]

    status, out, err = run_main_output(
        capsys, "outbox", "retry", parked, pending, "--database-url", url
    )
    assert out == "released 1 parked row(s) for another try\n"
    assert_one_error_line(status, err, 1, f"no parked row {pending}")
    status, out, _ = run_main_output(capsys, "outbox", "stats", "--database-url", url)
    assert out.startswith("pending 2, scheduled 0, parked 0"), out


@pytest.fixture
def stem() -> Iterator[str]:
    """A fresh database name for the demo; its ``<stem>_<service>`` databases go afterwards."""
    stem = f"cstest_{uuid.uuid4().hex[:12]}"
    yield stem
    with psycopg.connect(SERVER.render_as_string(hide_password=False), autocommit=True) as conn:
        for service in ("order", "inventory", "payment", "shipping"):
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(f"{stem}_{service}")
                )
            )


def test_demo_refuses_to_drop_a_database_it_did_not_create(stem: str) -> None:
    server = SERVER.render_as_string(hide_password=False)
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(f"{stem}_order")))
    mine = SERVER.set(database=f"{stem}_order").render_as_string(hide_password=False)
    with psycopg.connect(mine, autocommit=True) as conn:
        conn.execute("CREATE TABLE precious (id int)")
        conn.execute("INSERT INTO precious VALUES (42)")

    url = SERVER.set(database=stem).render_as_string(hide_password=False)
    result = saga("demo", "--orders", "2", "--database-url", url)

    assert_one_line(result, 2, f"refusing to drop {stem}_order")
    with psycopg.connect(mine) as conn:
        assert conn.execute("SELECT id FROM precious").fetchall() == [(42,)]
    with psycopg.connect(server) as conn:
        names = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (f"{stem}%",)
        ).fetchall()
    assert names == [(f"{stem}_order",)], "the demo created databases before refusing"


@pytest.mark.slow
def test_demo_runs_again_on_the_databases_it_created(stem: str) -> None:
    # A password (the test server trusts any) and two query parameters: the trace
    # command printed afterwards must still work when pasted into a shell.
    url = (
        SERVER.set(database=stem, password="s3cret").render_as_string(hide_password=False)
        + "?application_name=demo-test&connect_timeout=10"
    )
    for _ in range(2):
        # Nine orders: every outcome but the deadline, which would hold each run 10 s.
        result = saga("demo", "--orders", "9", "--database-url", url)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "all checks passed" in result.stdout
    # The story of an order is one printed command away, on the order service's database.
    lines = result.stdout.splitlines()
    hint = lines.index("  see any order's story (steps as the order service knows them):")
    command = lines[hint + 1]
    argv = shlex.split(command)  # as a shell hands it over
    assert argv[:2] == ["saga", "trace"], command
    assert "***" not in command  # libpq would send the placeholder as the password
    given = make_url(argv[argv.index("--database-url") + 1])
    assert (given.database, given.password) == (f"{stem}_order", None)
    assert dict(given.query) == {"application_name": "demo-test", "connect_timeout": "10"}
    assert "the password left out" in lines[hint + 2]
    story = saga(*argv[1:])
    assert story.returncode == 0, story.stdout + story.stderr
    assert "from the service database" in story.stdout
    with psycopg.connect(SERVER.render_as_string(hide_password=False)) as conn:
        marks = conn.execute(
            "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database "
            "WHERE datname LIKE %s ORDER BY datname",
            (f"{stem}%",),
        ).fetchall()
    assert [name for name, _ in marks] == [
        f"{stem}_{s}" for s in ("inventory", "order", "payment", "shipping")
    ]
    assert {mark for _, mark in marks} == {"made by saga demo, which may drop it"}


@pytest.mark.slow
def test_ctrl_c_cleans_up_and_exits_130() -> None:
    import re
    import signal

    demo = subprocess.Popen(
        [sys.executable, "-m", "saga", "demo", "--orders", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as a terminal sends it: a test run started in the background
        # by a shell (a CI script's `cmd &`) has SIGINT ignored, and the demo
        # would inherit that and never see the signal.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert demo.stdout is not None
    first = demo.stdout.readline()
    scratch = re.search(r"SQLite in (\S+)", first)
    assert scratch, first
    for line in demo.stdout:
        if "placed 20 orders" in line:
            break
    demo.send_signal(signal.SIGINT)
    _, err = demo.communicate(timeout=60)
    assert demo.returncode == 130
    assert err.strip() == "saga demo: interrupted"
    assert not Path(scratch.group(1)).exists(), "the temporary directory was left behind"


def test_relay_names_a_bad_kafka_variable() -> None:
    env = {"PATH": "/usr/bin:/bin", "KAFKA_SESSION_TIMEOUT_MS": "ten"}
    result = subprocess.run(
        [sys.executable, "-m", "saga", "relay", "--database-url", "sqlite:////nonexistent/x.db"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert_one_line(result, 2, "KAFKA_SESSION_TIMEOUT_MS", "'ten'")


def test_a_reader_that_goes_away_ends_the_command_quietly() -> None:
    """``saga ... | head`` closes the pipe early: the command stops without an error
    line, with the status a shell gives a tool ended by SIGPIPE (128 + 13)."""
    command = subprocess.Popen(
        [sys.executable, "-m", "saga", "schemas", "check"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert command.stdout is not None
    assert command.stderr is not None
    command.stdout.close()  # the reader is gone before the command writes
    with command.stderr:
        errors = command.stderr.read()
    assert command.wait(timeout=60) == 141
    assert errors == ""


@pytest.mark.parametrize(
    ("option", "bounds"),
    [("--startup-timeout", "above 0"), ("--poll-interval", "above 0"), ("--lease-ttl", "from 1")],
)
def test_relay_refuses_a_zero_duration_where_it_needs_one_above_zero(
    option: str, bounds: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Named as the option, like any other bad duration; not a Python ``timedelta`` repr."""
    from saga.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["relay", "--database-url", "sqlite:////nonexistent/x.db", option, "0"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: '0' is not a number of seconds {bounds}" in err
    assert "timedelta" not in err


def test_help_says_each_default_once() -> None:
    """No help repeats its default: ``output format (table) (default: table)``."""
    import argparse
    import re

    from saga.cli import build_parser

    def parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    yield from parsers(child)

    seen = 0
    for parser in parsers(build_parser()):
        text = " ".join(parser.format_help().split())
        seen += text.count("(default: ")
        repeated = re.findall(r"\(([^()]+)\) \(default: \1\)", text)
        assert not repeated, f"{parser.prog}: {repeated}"
    assert seen > 10  # the defaults are still shown


# The saga log commands (observe, trace, status, graph, abort) against the same
# mistakes as the outbox commands: run in-process through ``saga.cli.main``, the
# same error boundary a process goes through, without a process per case.

SAGA_LOG_COMMANDS = {
    "observe": ["observe", "--bootstrap-servers", "127.0.0.1:1"],
    "trace": ["trace", "order-1"],
    "status": ["status"],
    "graph": ["graph"],
    "abort": ["abort", "order-1", "--reason", "test", "--bootstrap-servers", "127.0.0.1:1"],
}


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run ``saga ARGS`` in this process: its exit status and what it wrote on stderr."""
    status, _, err = run_main_output(capsys, *args)
    return status, err


def run_main_output(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``saga ARGS`` in this process: its exit status, stdout and stderr."""
    from saga.cli import main

    capsys.readouterr()
    kafka_log = logging.getLogger("aiokafka")
    level = kafka_log.level  # main() quiets aiokafka: not for the tests after this one
    try:
        status = main(list(args))
    finally:
        kafka_log.setLevel(level)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_error_line(status: int, err: str, expected: int, *needles: str) -> None:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert status == expected, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_a_path_for_a_database_url_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file path without ``sqlite:///``: every command says it is not a database URL, exit 2."""
    path = str(tmp_path / "saga_log.db")
    commands = {
        **SAGA_LOG_COMMANDS,
        "outbox": ["outbox", "stats"],
        "relay": ["relay", "--startup-timeout", "1"],
    }
    for name, args in commands.items():
        status, err = run_main(capsys, *args, "--database-url", path)
        assert_one_error_line(status, err, 2, f"saga {name}: ", f"not a database URL: {path!r}")
    assert not Path(path).exists()


def test_an_in_memory_sqlite_url_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """``sqlite://`` is a database no other process sees (the services' or the log's):
    every command says so and asks for a file, exit 2."""
    commands = {**SAGA_LOG_COMMANDS, "outbox": ["outbox", "stats"], "relay": ["relay"]}
    for url in ("sqlite://", "sqlite+aiosqlite:///:memory:"):
        for name, args in commands.items():
            status, err = run_main(capsys, *args, "--database-url", url)
            assert_one_error_line(status, err, 2, f"saga {name}: ", "in memory", "sqlite:///")


def test_the_same_mistake_gets_the_same_exit_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing SQLite file, or no database at all, is a usage error (2) for every command."""
    url = f"sqlite:///{tmp_path / 'nothing.db'}"
    for name in ("trace", "status", "graph", "abort", "outbox"):
        args = ["outbox", "stats"] if name == "outbox" else SAGA_LOG_COMMANDS[name]
        status, err = run_main(capsys, *args, "--database-url", url)
        assert_one_error_line(status, err, 2, f"saga {name}: ", "no SQLite database at")
    assert not (tmp_path / "nothing.db").exists()
    for variable in ("SAGA_LOG_URL", "DATABASE_URL"):
        monkeypatch.delenv(variable, raising=False)
    for name in ("observe", "trace", "status", "graph", "outbox"):
        args = ["outbox", "stats"] if name == "outbox" else SAGA_LOG_COMMANDS[name]
        status, err = run_main(capsys, *args)
        assert_one_error_line(status, err, 2, f"saga {name}: ", "give --database-url")


def test_saga_log_commands_name_a_database_that_is_missing_or_down(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A PostgreSQL database that does not exist, or a server that refuses: one line, exit 1,
    as ``saga outbox stats`` says it; ``-v`` shows the traceback."""
    missing = f"cstest_missing_{uuid.uuid4().hex[:8]}"
    cases = [
        (SERVER.set(database=missing).render_as_string(hide_password=False), missing),
        ("postgresql://postgres@127.0.0.1:5999/saga_log", "refused"),
    ]
    for url, needle in cases:
        for name, args in SAGA_LOG_COMMANDS.items():
            status, err = run_main(capsys, *args, "--database-url", url)
            assert_one_error_line(status, err, 1, f"saga {name}: ", needle)
    status, err = run_main(capsys, "-v", "status", "--database-url", cases[1][0])
    assert status == 1
    assert "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("saga status: ")


def test_saga_log_commands_on_a_service_database_say_what_it_lacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A service's database (outbox tables, no saga log) given to status, graph or abort:
    one line saying it holds no saga log and which database to give, a usage error."""
    import asyncio

    from outbox import OutboxTables, create_engine

    url = f"sqlite:///{tmp_path / 'order.db'}"

    async def create() -> None:
        engine = create_engine(url)
        await OutboxTables().create_all(engine)
        await engine.dispose()

    asyncio.run(create())
    for name in ("status", "graph", "abort"):
        status, err = run_main(capsys, *SAGA_LOG_COMMANDS[name], "--database-url", url)
        assert_one_error_line(
            status, err, 2, f"saga {name}: ", "order.db", "holds no saga log", "saga observe"
        )
    status, err = run_main(capsys, "trace", "order-1", "--database-url", url)
    assert_one_error_line(
        status, err, 2, "saga trace: ", "order.db", "neither a saga log nor saga views"
    )


def test_outbox_commands_on_a_database_without_an_outbox_say_what_it_lacks(
    postgres_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A database without the outbox table (a saga log, an empty one) given to any
    ``saga outbox`` action: a usage error, as for the saga log commands, in one line
    naming the database (not its password) and the missing table."""
    url = make_url(postgres_url).set(password="hunter2").render_as_string(hide_password=False)
    database = make_url(postgres_url).database
    assert database is not None
    for action in (["stats"], ["parked"], ["retry"], ["retry", "1"], ["discard", "--yes", "1"]):
        status, err = run_main(capsys, "outbox", *action, "--database-url", url)
        assert_one_error_line(
            status, err, 2, "saga outbox: ", database, "holds no outbox", "no table outbox"
        )
        assert "hunter2" not in err
    log = f"sqlite:///{tmp_path / 'saga_log.db'}"
    asyncio.run(_create_saga_log(log))
    status, err = run_main(
        capsys, "outbox", "stats", "--outbox-table", "order_outbox", "--database-url", log
    )
    assert_one_error_line(status, err, 2, "saga_log.db", "no table order_outbox")


async def _create_saga_log(url: str) -> None:
    from saga import create_engine
    from saga.observe.log import SagaLog

    engine = create_engine(url)
    try:
        await SagaLog(dialect="sqlite").create_tables(engine)
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("argv", "usage", "unknown"),
    [
        (["demo", "--ordres", "5"], "usage: saga demo ", "--ordres 5"),
        (["outbox", "stats", "--bogus"], "usage: saga outbox stats ", "--bogus"),
        (["trace", "order-1", "--fromat", "json"], "usage: saga trace ", "--fromat json"),
    ],
    ids=["plug-in", "nested", "observe"],
)
def test_a_mistyped_option_shows_the_usage_of_its_command(
    argv: list[str], usage: str, unknown: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from saga.cli import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage), err
    assert f"error: unrecognized arguments: {unknown}" in err


async def test_graph_of_a_saga_the_log_has_not_seen_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from saga import create_engine
    from saga.observe.log import SagaLog

    url = f"sqlite:///{tmp_path / 'saga_log.db'}"
    engine = create_engine(url)
    try:
        await SagaLog(dialect="sqlite").create_tables(engine)
    finally:
        await engine.dispose()
    status, err = await asyncio.to_thread(
        run_main, capsys, "graph", "--saga", "nosuch", "--database-url", url
    )
    assert_one_error_line(status, err, 1, "saga graph: no saga message of saga 'nosuch'")


def test_saga_log_commands_refuse_a_log_keyed_by_the_saga_id_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A saga log made before a saga was (name, id) would show two sagas of one id as one:
    every command that reads it refuses it, in one line giving the SQL that migrates it."""
    from support import create_saga_log_keyed_by_id

    from saga import create_engine

    url = f"sqlite:///{tmp_path / 'saga_log.db'}"

    async def create() -> None:
        engine = create_engine(url)
        try:
            await create_saga_log_keyed_by_id(engine)
        finally:
            await engine.dispose()

    asyncio.run(create())
    for name in ("trace", "status", "graph", "abort"):
        status, err = run_main(capsys, *SAGA_LOG_COMMANDS[name], "--database-url", url)
        assert_one_error_line(
            status, err, 2, f"saga {name}: ", "saga_log_sagas", "(saga_name, saga_id)",
            "ALTER TABLE saga_log_sagas RENAME TO",
        )  # fmt: skip


def test_abort_without_a_saga_name_or_a_saga_log_says_to_give_one(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With neither --saga nor a saga log, saga abort cannot know which saga to ask for:
    a usage error saying so (it said the saga "is not in the saga log", which it never read)."""
    monkeypatch.delenv("SAGA_LOG_URL", raising=False)
    status, err = run_main(capsys, "abort", "order-1", "--reason", "customer cancelled")
    assert_one_error_line(status, err, 2, "give --saga NAME", "--database-url", "$SAGA_LOG_URL")
    assert "is not in the saga log" not in err
