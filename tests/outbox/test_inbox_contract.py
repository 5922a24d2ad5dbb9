"""The InboxStore contract, run against every implementation.

The inbox is the whole of deduplication: a unique ``(consumer, source,
message_id)`` written in the handler's transaction. These tests pin what a consumer relies
on: a redelivery is recognised, a rolled-back attempt is not, and two
consumers racing on the same message never both win.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

import outbox
from outbox import ConfigurationError, InboxStore, OutboxTables, SqlInboxStore

SOURCE = "/orders"


class Boom(Exception):
    """Raised inside a transaction to roll it back."""


class InboxStoreContract(ABC):
    """Tests every InboxStore implementation must pass.

    Subclasses provide the ``url`` fixture and :meth:`create_inbox`.
    """

    @abstractmethod
    def create_inbox(self, engine: AsyncEngine, tables: OutboxTables) -> InboxStore:
        """Return the inbox under test."""

    @pytest.fixture
    async def engine(self, url: str) -> AsyncIterator[AsyncEngine]:
        engine = outbox.create_engine(url)
        await OutboxTables().create_all(engine)
        yield engine
        await engine.dispose()

    @pytest.fixture
    def inbox(self, engine: AsyncEngine) -> InboxStore:
        return self.create_inbox(engine, OutboxTables())

    @staticmethod
    async def record(
        engine: AsyncEngine,
        inbox: InboxStore,
        consumer: str,
        message_id: str,
        source: str = SOURCE,
    ) -> bool:
        async with engine.begin() as conn:
            return await inbox.record(conn, consumer, message_id, source=source)

    async def test_first_delivery_is_new_and_a_redelivery_is_a_duplicate(
        self, engine: AsyncEngine, inbox: InboxStore
    ) -> None:
        assert await self.record(engine, inbox, "payments", "m-1") is True
        assert await self.record(engine, inbox, "payments", "m-1") is False
        assert await self.record(engine, inbox, "payments", "m-2") is True

    async def test_works_inside_an_orm_session_transaction(
        self, engine: AsyncEngine, inbox: InboxStore
    ) -> None:
        async with AsyncSession(engine) as session, session.begin():
            assert await inbox.record(session, "payments", "m-1", source=SOURCE) is True
        async with AsyncSession(engine) as session, session.begin():
            assert await inbox.record(session, "payments", "m-1", source=SOURCE) is False

    async def test_consumers_are_deduplicated_independently(
        self, engine: AsyncEngine, inbox: InboxStore
    ) -> None:
        assert await self.record(engine, inbox, "payments", "m-1") is True
        assert await self.record(engine, inbox, "shipping", "m-1") is True
        assert await self.record(engine, inbox, "shipping", "m-1") is False

    async def test_the_same_id_from_two_sources_is_two_messages(
        self, engine: AsyncEngine, inbox: InboxStore
    ) -> None:
        """Ids are unique per source only: ``/billing`` and ``/shipping`` may both send one."""
        assert await self.record(engine, inbox, "ledger", "order-42", "/billing") is True
        assert await self.record(engine, inbox, "ledger", "order-42", "/shipping") is True
        assert await self.record(engine, inbox, "ledger", "order-42", "/billing") is False
        assert await inbox.contains("ledger", "order-42", source="/shipping") is True
        assert await inbox.contains("ledger", "order-42", source="/returns") is False

    async def test_a_rolled_back_record_is_forgotten(
        self, engine: AsyncEngine, inbox: InboxStore
    ) -> None:
        with pytest.raises(Boom):
            async with engine.begin() as conn:
                assert await inbox.record(conn, "payments", "m-1", source=SOURCE) is True
                raise Boom

        assert await inbox.contains("payments", "m-1", source=SOURCE) is False
        assert await self.record(engine, inbox, "payments", "m-1") is True

    @pytest.mark.parametrize("first_outcome", ["commit", "rollback"])
    async def test_concurrent_deliveries_of_one_message_have_exactly_one_winner(
        self, engine: AsyncEngine, inbox: InboxStore, first_outcome: str
    ) -> None:
        """The second transaction waits for the first and then learns who won."""

        async def second_delivery() -> bool:
            async with engine.begin() as conn:
                return await inbox.record(conn, "payments", "m-1", source=SOURCE)

        async with engine.connect() as first:
            await first.begin()
            first_won = await inbox.record(first, "payments", "m-1", source=SOURCE)
            second = asyncio.create_task(second_delivery())
            await asyncio.sleep(0.3)
            assert not second.done(), "the second delivery must wait for the first"
            if first_outcome == "commit":
                await first.commit()
            else:
                await first.rollback()
        second_won = await asyncio.wait_for(second, 10)

        assert first_won is True
        assert second_won is (first_outcome == "rollback")
        assert await inbox.contains("payments", "m-1", source=SOURCE) is True

    async def test_a_batch_records_only_the_messages_not_recorded_before(
        self, engine: AsyncEngine, inbox: InboxStore
    ) -> None:
        """What a batch of messages relies on: one read up front, one write at the end.

        ``record_many`` reports exactly the keys it recorded (a key recorded
        before, by this consumer, is left out: the batch then knows another
        transaction took it); ``recorded`` reads them back, for this consumer
        only, past its statement's bound of 500 keys.
        """
        await self.record(engine, inbox, "ledger", "m-1", "/billing")
        await self.record(engine, inbox, "shipping", "m-2", "/billing")
        keys = [("/billing", "m-1"), ("/billing", "m-2"), ("/shipping", "m-1")]
        async with engine.begin() as conn:
            assert await inbox.record_many(conn, "ledger", keys) == set(keys[1:])
        async with engine.begin() as conn:
            assert await inbox.record_many(conn, "ledger", keys) == set()

        many = [("/billing", f"n-{i}") for i in range(1200)]
        async with engine.begin() as conn:
            assert await inbox.record_many(conn, "ledger", many[::2]) == set(many[::2])
        async with engine.begin() as conn:
            assert await inbox.recorded(conn, "ledger", many + keys) == set(many[::2] + keys)
            assert await inbox.recorded(conn, "shipping", keys) == {("/billing", "m-2")}

    async def test_a_batch_rolled_back_records_nothing(
        self, engine: AsyncEngine, inbox: InboxStore
    ) -> None:
        keys = [(SOURCE, "m-1"), (SOURCE, "m-2")]
        with pytest.raises(Boom):
            async with engine.begin() as conn:
                assert await inbox.record_many(conn, "payments", keys) == set(keys)
                raise Boom
        async with engine.begin() as conn:
            assert await inbox.recorded(conn, "payments", keys) == set()

    async def test_contains_sees_only_committed_records(
        self, engine: AsyncEngine, inbox: InboxStore
    ) -> None:
        assert await inbox.contains("payments", "m-1", source=SOURCE) is False
        await self.record(engine, inbox, "payments", "m-1")

        assert await inbox.contains("payments", "m-1", source=SOURCE) is True
        assert await inbox.contains("shipping", "m-1", source=SOURCE) is False
        assert await inbox.contains("payments", "m-2", source=SOURCE) is False

    async def test_purge_deletes_old_records_at_most_limit_at_a_time(
        self, engine: AsyncEngine, inbox: InboxStore
    ) -> None:
        for i in range(5):
            await self.record(engine, inbox, "payments", f"m-{i}")
        await asyncio.sleep(0.01)  # recorded strictly before "now - 0"

        assert await inbox.purge(timedelta(hours=1), 100) == 0
        assert await inbox.purge(timedelta(0), 3) == 3
        assert await inbox.purge(timedelta(0), 3) == 2
        assert await inbox.purge(timedelta(0), 3) == 0

        # Purged ids are forgotten: a (very late) redelivery counts as new.
        assert await self.record(engine, inbox, "payments", "m-0") is True

    @pytest.mark.parametrize(
        ("consumer", "source", "message_id"),
        [
            ("", SOURCE, "m-1"),
            ("c" * 201, SOURCE, "m-1"),
            ("payments", "", "m-1"),
            ("payments", "s" * 201, "m-1"),
            ("payments", SOURCE, ""),
            ("payments", SOURCE, "m" * 201),
        ],
        ids=[
            "empty consumer",
            "long consumer",
            "empty source",
            "long source",
            "empty id",
            "long id",
        ],
    )
    async def test_invalid_names_are_refused(
        self,
        engine: AsyncEngine,
        inbox: InboxStore,
        consumer: str,
        source: str,
        message_id: str,
    ) -> None:
        async with engine.begin() as conn:
            with pytest.raises(ConfigurationError):
                await inbox.record(conn, consumer, message_id, source=source)

    async def test_names_of_200_characters_are_accepted(
        self, engine: AsyncEngine, inbox: InboxStore
    ) -> None:
        consumer, source, message_id = "c" * 200, "s" * 200, "m" * 200

        assert await self.record(engine, inbox, consumer, message_id, source) is True
        assert await inbox.contains(consumer, message_id, source=source) is True


class TestSqliteInboxStore(InboxStoreContract):
    @pytest.fixture
    def url(self, sqlite_url: str) -> str:
        return sqlite_url

    def create_inbox(self, engine: AsyncEngine, tables: OutboxTables) -> InboxStore:
        return SqlInboxStore(engine, tables)


class TestPostgresInboxStore(InboxStoreContract):
    @pytest.fixture
    def url(self, postgres_url: str) -> str:
        return postgres_url

    def create_inbox(self, engine: AsyncEngine, tables: OutboxTables) -> InboxStore:
        return SqlInboxStore(engine, tables)
