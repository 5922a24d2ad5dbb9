"""The database fixtures give every test a fresh database and clean it up."""

from __future__ import annotations

import os
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

SERVER_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def existing_databases() -> set[str]:
    server = make_url(SERVER_URL).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(server, autocommit=True) as conn:
        return {row[0] for row in conn.execute("SELECT datname FROM pg_database")}


@pytest.fixture(scope="module")
def used_databases() -> Iterator[dict[str, psycopg.Connection]]:
    """Collects the databases tests used; checks after the module that all are gone."""
    used: dict[str, psycopg.Connection] = {}
    yield used
    if not used:  # the tests failed before creating anything
        return
    try:
        leftovers = set(used) & existing_databases()
        assert not leftovers, f"databases not dropped after their test: {leftovers}"
    finally:
        for conn in used.values():
            conn.close()


async def table_names(url: str) -> list[str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(lambda sync: inspect(sync).get_table_names())
    finally:
        await engine.dispose()


async def test_database_url_starts_empty_and_is_private_to_the_test(database_url: str) -> None:
    assert await table_names(database_url) == []
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE scratch (id INTEGER PRIMARY KEY)"))
    finally:
        await engine.dispose()
    assert await table_names(database_url) == ["scratch"]


async def test_postgres_url_is_dropped_even_with_a_leaked_connection(
    postgres_url: str, used_databases: dict[str, psycopg.Connection]
) -> None:
    url = make_url(postgres_url)
    assert url.drivername == "postgresql+psycopg"
    assert url.database is not None
    assert url.database.startswith("cstest_")
    assert url.database in existing_databases()
    # Left open on purpose: teardown must drop the database anyway (FORCE).
    libpq = url.set(drivername="postgresql").render_as_string(hide_password=False)
    used_databases[url.database] = psycopg.connect(libpq, autocommit=True)
