"""The error model classifies real database errors as a user would expect.

An outage must wait, a transient failure must be retried a bounded number of
times, and anything else must stop the message: each case is produced here
against the real servers, not built by hand.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox import ErrorKind, StoreError, classify, create_engine, database
from outbox.database import translate_db_error


async def _error_of(engine, statement: str) -> SQLAlchemyError:
    with pytest.raises(SQLAlchemyError) as caught:
        async with engine.begin() as conn:
            await conn.execute(text(statement))
    return caught.value


async def test_pool_timeout_is_an_outage(postgres_url: str) -> None:
    """A momentary pool exhaustion must never fail a step (it is not the message's fault)."""
    engine = create_engine(postgres_url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    try:
        async with engine.connect():
            with pytest.raises(SQLAlchemyError) as caught:
                async with engine.connect():
                    pass
        assert classify(caught.value) is ErrorKind.OUTAGE
        assert translate_db_error(caught.value, "x").kind is ErrorKind.OUTAGE
    finally:
        await engine.dispose()


async def test_unreachable_server_is_an_outage() -> None:
    engine = create_engine("postgresql://postgres@127.0.0.1:1/none")
    try:
        with pytest.raises(SQLAlchemyError) as caught:
            async with engine.connect():
                pass
        assert classify(caught.value) is ErrorKind.OUTAGE
    finally:
        await engine.dispose()


async def test_missing_database_is_permanent_not_an_outage(postgres_url: str) -> None:
    """A database that does not exist will not appear by waiting: say so at once."""
    from sqlalchemy.engine import make_url

    missing = make_url(postgres_url).set(database="cstest_does_not_exist")
    engine = create_engine(missing)
    try:
        with pytest.raises(SQLAlchemyError) as caught:
            async with engine.connect():
                pass
        assert classify(caught.value) is ErrorKind.PERMANENT
    finally:
        await engine.dispose()


async def test_statement_timeout_is_transient_not_an_outage(postgres_url: str) -> None:
    """57014 must be bounded: a statement that always times out would block forever."""
    engine = create_engine(postgres_url)
    try:
        error = await _error_of(engine, "SET LOCAL statement_timeout = 50; SELECT pg_sleep(1)")
        assert classify(error) is ErrorKind.TRANSIENT
    finally:
        await engine.dispose()


async def test_terminated_connection_is_an_outage(postgres_url: str) -> None:
    engine = create_engine(postgres_url, pool_pre_ping=False)
    try:
        with pytest.raises(SQLAlchemyError) as caught:
            async with engine.begin() as conn:
                await conn.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        assert classify(caught.value) is ErrorKind.OUTAGE
    finally:
        await engine.dispose()


async def _backend_pid(engine: AsyncEngine) -> int:
    async with engine.begin() as conn:
        return int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())


@pytest.fixture
async def pooled_then_killed(postgres_url: str) -> AsyncIterator[tuple[AsyncEngine, int]]:
    """An engine whose one pooled connection (its backend ``pid``) was just terminated."""
    engine = create_engine(postgres_url)
    other = create_engine(postgres_url)
    try:
        pid = await _backend_pid(engine)
        async with other.begin() as conn:
            await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        await asyncio.sleep(0.05)  # the backend is gone once the signal is handled
        yield engine, pid
    finally:
        await engine.dispose()
        await other.dispose()


async def test_a_connection_that_died_resting_in_the_pool_is_replaced_unseen(
    pooled_then_killed: tuple[AsyncEngine, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rested past PING_AFTER_IDLE, a pooled connection is checked before it is handed out."""
    engine, pid = pooled_then_killed
    monkeypatch.setattr(database, "PING_AFTER_IDLE", 0.2)
    await asyncio.sleep(0.3)
    assert await _backend_pid(engine) != pid  # no error: a new connection


async def test_a_connection_that_died_in_steady_use_is_an_outage_then_replaced(
    pooled_then_killed: tuple[AsyncEngine, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within PING_AFTER_IDLE of its last use a connection is not checked (no round trip
    before each transaction): one that died meanwhile fails its next statement as an
    outage, which callers wait out, and the pool then replaces it."""
    engine, pid = pooled_then_killed
    monkeypatch.setattr(database, "PING_AFTER_IDLE", 60.0)
    with pytest.raises(SQLAlchemyError) as caught:
        await _backend_pid(engine)
    assert classify(caught.value) is ErrorKind.OUTAGE
    assert await _backend_pid(engine) != pid


async def test_sql_mistakes_and_constraints_are_permanent(
    postgres_url: str, tmp_path: Path
) -> None:
    engine = create_engine(postgres_url)
    lite = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        assert classify(await _error_of(engine, "SELEC 1")) is ErrorKind.PERMANENT
        error = await _error_of(
            engine, "CREATE TEMP TABLE t (x int primary key); INSERT INTO t VALUES (1), (1)"
        )
        assert classify(error) is ErrorKind.PERMANENT
        assert classify(await _error_of(lite, "SELEC 1")) is ErrorKind.PERMANENT
    finally:
        await engine.dispose()
        await lite.dispose()


async def test_sqlite_lock_contention_is_transient(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    first = create_engine(f"sqlite:///{path}")
    second = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.05})
    try:
        async with first.begin() as conn:
            await conn.execute(text("CREATE TABLE t (x int)"))
        async with first.begin() as conn:
            await conn.execute(text("INSERT INTO t VALUES (1)"))
            error = await _error_of(second, "INSERT INTO t VALUES (2)")
        assert classify(error) is ErrorKind.TRANSIENT
    finally:
        await first.dispose()
        await second.dispose()


def test_wrappers_keep_the_kind_of_their_cause() -> None:
    """A handler that wraps a lost connection in its own error is still facing an outage."""

    class Mine(Exception):
        pass

    wrapped = Mine("could not save")
    wrapped.__cause__ = PoolTimeoutError("QueuePool limit of size 1 overflow 0 reached")
    assert classify(wrapped) is ErrorKind.OUTAGE
    # A handler's own client failing to connect is bounded, not an outage of ours.
    assert classify(ConnectionRefusedError("api.example:443")) is ErrorKind.TRANSIENT
    assert classify(KeyError("x")) is ErrorKind.PERMANENT
    assert classify(asyncio.CancelledError()) is ErrorKind.PERMANENT

    class Flaky(Exception):
        retriable = True

    assert classify(Flaky()) is ErrorKind.TRANSIENT
    assert StoreError("x", kind=ErrorKind.OUTAGE).retriable
    assert not StoreError("x").retriable


def test_an_outage_re_raised_inside_except_is_still_an_outage() -> None:
    """``except SQLAlchemyError: raise RepoError()`` without ``from`` keeps the context."""

    class RepoError(Exception):
        pass

    def save() -> None:
        try:
            raise PoolTimeoutError("QueuePool limit of size 1 overflow 0 reached")
        except PoolTimeoutError:
            raise RepoError("could not save")  # noqa: B904 (no "from": what is tested)

    try:
        save()
    except RepoError as exc:
        caught = exc
    assert classify(caught) is ErrorKind.OUTAGE
    hidden = RepoError("hidden")
    hidden.__context__ = PoolTimeoutError("x")
    hidden.__suppress_context__ = True  # raise ... from None: the author chose to hide it
    assert classify(hidden) is ErrorKind.PERMANENT


async def test_a_statement_psycopg_refuses_to_send_is_transient(postgres_url: str) -> None:
    engine = create_engine(postgres_url)
    try:
        params = ", ".join(f":p{i}" for i in range(70_000))
        with pytest.raises(SQLAlchemyError) as caught:
            async with engine.connect() as conn:
                await conn.execute(
                    text(f"SELECT 1 WHERE 1 IN ({params})"), {f"p{i}": i for i in range(70_000)}
                )
        assert classify(caught.value) is ErrorKind.TRANSIENT
    finally:
        await engine.dispose()
