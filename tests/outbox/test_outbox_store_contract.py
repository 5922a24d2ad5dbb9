"""The OutboxStore contract, run against every implementation.

:class:`OutboxStoreContract` holds the behaviour any outbox store must have
(the relay relies on all of it); each backend subclasses it and says how to
make a store and how another client sees committed rows. Behaviour only one
backend can show (commit-order inversion needs concurrent writers, which
SQLite serialises; reusing a purged row's id is SQLite's) lives in that backend's class.
"""

from __future__ import annotations

import asyncio
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

import outbox
from outbox import OutboxMessage, OutboxStore, OutboxTables, SqlOutboxStore, StoredMessage

TTL = timedelta(seconds=1)
"""The lease of a relay that a test lets run out (and waits out)."""
LONG_TTL = timedelta(seconds=30)
"""The lease of a relay that must stay alive however slowly the test's claims run."""

# A table of the application's own state, written in the same transaction.
STATE = sa.MetaData()
ORDERS = sa.Table(
    "orders",
    STATE,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("status", sa.String(20), nullable=False),
)


class Boom(Exception):
    """Raised inside a transaction to roll it back."""


def message(
    topic: str = "orders", *, key: bytes | None = None, value: bytes | None = b"v", **kw: Any
) -> OutboxMessage:
    return OutboxMessage(topic=topic, key=key, value=value, **kw)


class OutboxStoreContract(ABC):
    """Tests every OutboxStore implementation must pass.

    Subclasses provide the ``url`` fixture, :meth:`create_store` and
    :meth:`committed_rows_seen_elsewhere`.
    """

    @abstractmethod
    def create_store(self, engine: AsyncEngine, tables: OutboxTables) -> OutboxStore:
        """Return the store under test, reading through ``engine``."""

    @abstractmethod
    def committed_rows_seen_elsewhere(self, url: str) -> int:
        """Count outbox rows as a separate, synchronous client sees them (committed only)."""

    @pytest.fixture
    async def engine(self, url: str) -> AsyncIterator[AsyncEngine]:
        engine = outbox.create_engine(url)
        await OutboxTables().create_all(engine)
        async with engine.begin() as conn:
            await conn.run_sync(STATE.create_all)
        yield engine
        await engine.dispose()

    @pytest.fixture
    def store(self, engine: AsyncEngine) -> OutboxStore:
        return self.create_store(engine, OutboxTables())

    @pytest.fixture
    def other_store(self, engine: AsyncEngine) -> OutboxStore:
        """A second store on the same tables, as another relay process would have."""
        return self.create_store(engine, OutboxTables())

    # -- helpers ----------------------------------------------------------------

    @staticmethod
    async def add(engine: AsyncEngine, store: OutboxStore, *messages: OutboxMessage) -> None:
        async with engine.begin() as conn:
            await store.add(conn, messages)

    @staticmethod
    async def fetch(store: OutboxStore, shards: Iterable[int] | None = None) -> list[StoredMessage]:
        chosen = range(store.shards) if shards is None else shards
        return await store.fetch_due(set(chosen), 10_000)

    @staticmethod
    def ids(messages: Iterable[StoredMessage]) -> list[str]:
        return [m.message_id for m in messages]

    # -- what the relay reads -----------------------------------------------------

    async def test_rows_of_a_rolled_back_transaction_are_never_fetched(
        self, engine: AsyncEngine, store: OutboxStore
    ) -> None:
        with pytest.raises(Boom):
            async with engine.begin() as conn:
                await store.add(conn, [message(value=b"lost")])
                raise Boom
        kept = message(value=b"kept")
        await self.add(engine, store, kept)

        assert self.ids(await self.fetch(store)) == [kept.message_id]

    async def test_committed_rows_come_back_in_id_order_exactly_as_written(
        self, engine: AsyncEngine, store: OutboxStore
    ) -> None:
        binary = bytes(range(256))
        written = [
            message(
                "orders.v1",
                key=b"\x00order-1\xff",
                value=binary * 3,
                headers=[("ce_type", b"created"), ("dup", b"1"), ("dup", b"2"), ("empty", b"")],
            ),
            message("orders.v1", key=b"\x00order-1\xff", value=None),  # tombstone
            message("payments", key=None, value=b"", headers=[("bin", binary)]),
        ]
        async with engine.begin() as conn:
            await store.add(conn, written[:2])
        await self.add(engine, store, written[2])

        fetched = await self.fetch(store)

        assert [m.id for m in fetched] == sorted(m.id for m in fetched)
        assert [(m.message_id, m.topic, m.key, m.value, m.headers) for m in fetched] == [
            (w.message_id, w.topic, w.key, w.value, tuple(w.headers)) for w in written
        ]
        assert fetched[1].value is None
        assert all(m.attempts == 0 for m in fetched)

    async def test_fetch_due_returns_at_most_limit_rows_oldest_first(
        self, engine: AsyncEngine, store: OutboxStore
    ) -> None:
        written = [message(value=str(i).encode()) for i in range(5)]
        await self.add(engine, store, *written)

        first = await store.fetch_due(set(range(store.shards)), 2)

        assert self.ids(first) == [m.message_id for m in written[:2]]

    # -- scheduled rows -------------------------------------------------------------

    async def test_delayed_row_is_fetched_only_once_its_delay_has_passed(
        self, engine: AsyncEngine, store: OutboxStore
    ) -> None:
        delayed = message(delay=timedelta(seconds=1))
        await self.add(engine, store, delayed)
        all_shards = set(range(store.shards))

        assert await self.fetch(store) == []
        wait = await store.next_due_in(all_shards)
        assert wait is not None
        assert timedelta(0) < wait <= timedelta(seconds=1)

        await asyncio.sleep(wait.total_seconds() + 0.05)

        assert self.ids(await self.fetch(store)) == [delayed.message_id]

    async def test_next_due_in_is_none_without_scheduled_rows(
        self, engine: AsyncEngine, store: OutboxStore
    ) -> None:
        await self.add(engine, store, message())

        assert await store.next_due_in(set(range(store.shards))) is None

    async def test_deliver_at_in_the_past_is_due_at_once_and_in_the_future_is_not(
        self, engine: AsyncEngine, store: OutboxStore
    ) -> None:
        now = datetime.now(UTC)
        past = message(deliver_at=now - timedelta(minutes=5))
        future = message(deliver_at=now + timedelta(seconds=2))
        await self.add(engine, store, past, future)

        assert self.ids(await self.fetch(store)) == [past.message_id]
        wait = await store.next_due_in(set(range(store.shards)))
        assert wait is not None
        assert wait <= timedelta(seconds=2)

    # -- marking --------------------------------------------------------------------

    async def test_mark_published_marks_only_the_given_rows_and_is_idempotent(
        self, engine: AsyncEngine, store: OutboxStore
    ) -> None:
        await self.add(engine, store, message(), message(), message())
        first, second, third = await self.fetch(store)

        assert await store.mark_published([first, third]) == 2
        assert self.ids(await self.fetch(store)) == [second.message_id]
        assert await store.mark_published([first, third]) == 0
        assert await store.mark_published([]) == 0
        stats = await store.stats()
        assert (stats.pending, stats.parked, stats.published) == (1, 0, 2)

    async def test_marking_with_delete_removes_exactly_the_given_rows(
        self, engine: AsyncEngine, store: OutboxStore
    ) -> None:
        """A relay that keeps no published rows deletes them; the others stay due."""
        await self.add(engine, store, message(), message(), message())
        first, second, third = await self.fetch(store)

        assert await store.mark_published([first, third], delete=True) == 2
        assert self.ids(await self.fetch(store)) == [second.message_id]
        assert await store.mark_published([first, third], delete=True) == 0
        stats = await store.stats()
        assert (stats.pending, stats.parked, stats.published) == (1, 0, 0)

    async def test_marking_with_delete_never_removes_a_row_published_meanwhile(
        self, engine: AsyncEngine, store: OutboxStore
    ) -> None:
        """Deleting is marking: a row another relay marked is not deleted (nor counted)."""
        await self.add(engine, store, message(), message())
        first, second = await self.fetch(store)
        assert await store.mark_published([first]) == 1

        assert await store.mark_published([first, second], delete=True) == 1
        stats = await store.stats()
        assert (stats.pending, stats.published) == (0, 1)

    async def test_the_read_ahead_leaves_out_runs_and_scattered_ids_in_flight(
        self, engine: AsyncEngine, store: OutboxStore
    ) -> None:
        """In flight may be runs of consecutive ids or ids with gaps between them.

        Runs are left out as ranges and scattered ids as an array: either way
        exactly the rows in flight are left out, and the rows in the gaps
        between them are read, in id order.
        """
        await self.add(engine, store, *(message() for _ in range(60)))
        rows = await self.fetch(store)
        every_shard = set(range(store.shards))
        cases = {
            "one run": rows[:20],
            "two runs with a gap": rows[:10] + rows[15:30],
            "every other row (too many runs for ranges)": rows[:40:2],
            "nothing": [],
        }
        for case, in_flight in cases.items():
            left_out = {m.id for m in in_flight}
            ahead = await store.fetch_due(every_shard, 100, exclude=left_out)
            expected = [m for m in rows if m.id not in left_out]
            assert self.ids(ahead) == self.ids(expected), case

    async def test_rows_with_any_message_id_are_marked_and_left_out_while_in_flight(
        self, engine: AsyncEngine, store: OutboxStore
    ) -> None:
        """Message ids are the writer's: quotes, commas or "NULL" must not confuse the mark."""
        odd = ['say "hi"', "back\\slash", "a,b", "{braced}", " spaced ", "NULL", "ünï ☃", '\\"']
        await self.add(engine, store, *(message(message_id=i) for i in odd), message())
        fetched = await self.fetch(store)
        in_flight, rest = fetched[:4], fetched[4:]

        every_shard = set(range(store.shards))
        ahead = await store.fetch_due(every_shard, 100, exclude={m.id for m in in_flight})
        assert self.ids(ahead) == self.ids(rest)
        assert await store.mark_published(fetched[:-1]) == len(odd)
        assert self.ids(await self.fetch(store)) == [fetched[-1].message_id]

    async def test_mark_published_needs_the_message_id_as_well_as_the_row_id(
        self, engine: AsyncEngine, store: OutboxStore
    ) -> None:
        """A row id taken over by another message must not be marked nor deleted.

        SQLite reuses the ids of deleted rows; PostgreSQL hands an id out
        again after ``TRUNCATE ... RESTART IDENTITY``, a sequence reset or a
        table re-created while a relay has a batch in flight.
        """
        await self.add(engine, store, message())
        (row,) = await self.fetch(store)
        impostor = StoredMessage(
            id=row.id,
            message_id="some-other-message",
            topic=row.topic,
            key=row.key,
            value=row.value,
            headers=row.headers,
            shard=row.shard,
            attempts=row.attempts,
        )

        assert await store.mark_published([impostor]) == 0
        assert await store.mark_published([impostor], delete=True) == 0
        assert self.ids(await self.fetch(store)) == [row.message_id]

    async def test_stats_count_due_scheduled_parked_and_published_rows(
        self, engine: AsyncEngine, store: OutboxStore
    ) -> None:
        await self.add(engine, store, *(message(key=str(i).encode()) for i in range(5)))
        await self.add(engine, store, message(delay=timedelta(hours=1)))
        rows = await self.fetch(store)
        await store.mark_published(rows[:2])
        await store.record_failure(rows[2], "too big", park=True)

        stats = await store.stats()

        assert (stats.pending, stats.scheduled, stats.parked, stats.published) == (2, 1, 1, 2)

    # -- failures and parking ---------------------------------------------------------

    async def test_transient_failure_counts_the_attempt_and_keeps_the_row_fetchable(
        self, engine: AsyncEngine, store: OutboxStore
    ) -> None:
        await self.add(engine, store, message(key=b"k"))
        (row,) = await self.fetch(store)

        await store.record_failure(row, "broker down", park=False)
        await store.record_failure(row, "broker down", park=False)

        (again,) = await self.fetch(store)
        assert (again.message_id, again.attempts) == (row.message_id, 2)
        assert await store.parked() == []

    async def test_parked_row_is_set_aside_with_its_error_and_holds_back_its_key_only(
        self, engine: AsyncEngine, store: OutboxStore
    ) -> None:
        first_a = message(key=b"a", value=b"a1")
        first_b = message(key=b"b", value=b"b1")
        second_a = message(key=b"a", value=b"a2")
        await self.add(engine, store, first_a, first_b)
        await self.add(engine, store, second_a)
        rows = {m.message_id: m for m in await self.fetch(store)}

        await store.record_failure(rows[first_a.message_id], "too big", park=True)

        assert self.ids(await self.fetch(store)) == [first_b.message_id]
        (parked,) = await store.parked()
        assert parked.message.message_id == first_a.message_id
        assert parked.message.value == b"a1"
        assert parked.message.attempts == 1
        assert parked.error == "too big"
        assert abs(parked.parked_at - datetime.now(UTC)) < timedelta(minutes=1)

    async def test_next_due_in_ignores_a_due_row_held_back_behind_a_parked_row(
        self, engine: AsyncEngine, store: OutboxStore
    ) -> None:
        """Else the relay, told "due now" forever, polls the database in a tight loop."""
        blocker = message(key=b"saga-1", value=b"too big")
        timeout = message(key=b"saga-1", value=b"deadline", delay=timedelta(milliseconds=500))
        await self.add(engine, store, blocker, timeout)
        # By id: on a slow machine the scheduled row may already be due here too.
        (row,) = [m for m in await self.fetch(store) if m.message_id == blocker.message_id]
        await store.record_failure(row, "too big", park=True)
        await asyncio.sleep(0.6)  # the scheduled row is now due, but held back

        assert await self.fetch(store) == []
        assert await store.next_due_in(set(range(store.shards))) is None

    @pytest.mark.parametrize("which", ["all", "by message id"])
    async def test_retried_parked_row_is_fetched_again_before_the_rest_of_its_key(
        self, engine: AsyncEngine, store: OutboxStore, which: str
    ) -> None:
        first_a = message(key=b"a", value=b"a1")
        first_b = message(key=b"b", value=b"b1")
        second_a = message(key=b"a", value=b"a2")
        await self.add(engine, store, first_a, first_b, second_a)
        rows = {m.message_id: m for m in await self.fetch(store)}
        await store.record_failure(rows[first_a.message_id], "too big", park=True)

        if which == "all":
            assert await store.retry_parked() == 1
        else:
            assert await store.retry_parked(["not-parked", first_b.message_id]) == 0
            assert await store.retry_parked([first_a.message_id]) == 1

        fetched = self.ids(await self.fetch(store))
        assert fetched == [first_a.message_id, first_b.message_id, second_a.message_id]
        assert await store.parked() == []
        assert (await store.stats()).parked == 0

    async def test_parked_row_holds_back_only_its_own_topic_and_key(
        self, engine: AsyncEngine, store: OutboxStore
    ) -> None:
        """A row parked for one topic must not stop the same key on another topic."""
        blocker = message("bad topic!", key=b"saga-1", value=b"never")
        same_key_other_topic = message("orders", key=b"saga-1", value=b"compensate")
        same_topic_and_key = message("bad topic!", key=b"saga-1", value=b"after")
        await self.add(engine, store, blocker, same_key_other_topic, same_topic_and_key)
        (row, *_) = await self.fetch(store)
        await store.record_failure(row, "InvalidTopicError", park=True)

        assert self.ids(await self.fetch(store)) == [same_key_other_topic.message_id]

    async def test_discarded_parked_rows_are_gone_and_release_their_key(
        self, engine: AsyncEngine, store: OutboxStore
    ) -> None:
        blocker = message(key=b"a", value=b"a1")
        behind = message(key=b"a", value=b"a2")
        pending = message(key=b"b", value=b"b1")
        await self.add(engine, store, blocker, behind, pending)
        rows = {m.message_id: m for m in await self.fetch(store)}
        await store.record_failure(rows[blocker.message_id], "too big", park=True)

        # Only parked rows can be discarded: a pending row is never thrown away.
        assert await store.discard_parked([pending.message_id, "no-such-id"]) == 0
        assert await store.discard_parked([blocker.message_id]) == 1

        assert await store.parked() == []
        assert self.ids(await self.fetch(store)) == [behind.message_id, pending.message_id]
        assert (await store.stats()).parked == 0
        assert await store.discard_parked([]) == 0

    async def test_parked_rows_are_listed_oldest_first_up_to_limit(
        self, engine: AsyncEngine, store: OutboxStore
    ) -> None:
        await self.add(engine, store, *(message(key=str(i).encode()) for i in range(3)))
        rows = await self.fetch(store)
        for row in reversed(rows):
            await store.record_failure(row, f"bad {row.key!r}", park=True)

        parked = await store.parked(limit=2)

        assert [p.message.message_id for p in parked] == self.ids(rows[:2])

    # -- shards ----------------------------------------------------------------------

    async def test_fetch_due_returns_only_rows_of_the_asked_shards(
        self, engine: AsyncEngine, store: OutboxStore
    ) -> None:
        keyed = [message(key=f"order-{i % 10}".encode()) for i in range(40)]
        keyless = [message(key=None) for _ in range(40)]
        await self.add(engine, store, *keyed, *keyless)

        by_shard = {s: await self.fetch(store, {s}) for s in range(store.shards)}

        for shard, rows in by_shard.items():
            assert {m.shard for m in rows} <= {shard}
        everything = [m.message_id for rows in by_shard.values() for m in rows]
        assert sorted(everything) == sorted(m.message_id for m in keyed + keyless)
        shard_of_key: dict[bytes | None, set[int]] = {}
        for rows in by_shard.values():
            for m in rows:
                shard_of_key.setdefault(m.key, set()).add(m.shard)
        keyless_shards = shard_of_key.pop(None)
        assert all(len(shards) == 1 for shards in shard_of_key.values())
        assert len(keyless_shards) > 1
        assert await store.fetch_due(set(), 100) == []

    # -- cleanup ---------------------------------------------------------------------

    async def test_purge_deletes_only_old_published_rows_at_most_limit_at_a_time(
        self, engine: AsyncEngine, store: OutboxStore
    ) -> None:
        await self.add(engine, store, *(message() for _ in range(5)))
        rows = await self.fetch(store)
        await store.mark_published(rows[:3])
        await asyncio.sleep(0.01)  # published strictly before "now - 0"

        assert await store.purge_published(timedelta(hours=1), 100) == 0
        assert await store.purge_published(timedelta(0), 2) == 2
        assert await store.purge_published(timedelta(0), 2) == 1
        assert await store.purge_published(timedelta(0), 2) == 0

        stats = await store.stats()
        assert (stats.pending, stats.published) == (2, 0)
        assert self.ids(await self.fetch(store)) == self.ids(rows[3:])

    # -- shard leases -------------------------------------------------------------------

    async def test_lone_relay_gets_all_shards_and_two_relays_split_them_fairly(
        self, store: OutboxStore, other_store: OutboxStore
    ) -> None:
        everything = frozenset(range(store.shards))

        assert await store.claim_shards("a", LONG_TTL) == everything
        await other_store.claim_shards("b", LONG_TTL)
        a = await store.claim_shards("a", LONG_TTL)
        b = await other_store.claim_shards("b", LONG_TTL)

        assert not a & b
        assert a | b == everything
        assert len(a) == len(b) == store.shards // 2

    async def test_released_shards_go_to_the_remaining_relay(
        self, store: OutboxStore, other_store: OutboxStore
    ) -> None:
        await store.claim_shards("a", LONG_TTL)
        await other_store.claim_shards("b", LONG_TTL)
        await store.claim_shards("a", LONG_TTL)
        assert await other_store.claim_shards("b", LONG_TTL) != frozenset(range(store.shards))

        await store.release_shards("a")

        assert await other_store.claim_shards("b", LONG_TTL) == frozenset(range(store.shards))

    async def test_lease_not_renewed_within_its_ttl_is_taken_over(
        self, store: OutboxStore, other_store: OutboxStore
    ) -> None:
        everything = frozenset(range(store.shards))
        assert await store.claim_shards("a", TTL) == everything
        assert await other_store.claim_shards("b", LONG_TTL) == frozenset()

        await asyncio.sleep(1.2)  # "a" died without releasing

        assert await other_store.claim_shards("b", LONG_TTL) == everything
        assert await store.claim_shards("a", TTL) == frozenset()

    async def test_claim_without_rebalance_renews_and_takes_but_never_gives(
        self, store: OutboxStore, other_store: OutboxStore
    ) -> None:
        # No sleep stands between claims that must land within a lease: "a" renews
        # at once, with a long lease, and "b" looks again once the first claim has
        # run out. (With sleeps between the claims and one lease for all, the
        # renewal had 0.4 s to spare, later 0.8 s for b's last look: a loaded CI
        # machine missed the first.)
        first = 2 * TTL
        everything = frozenset(range(store.shards))
        assert await store.claim_shards("a", first) == everything
        assert await other_store.claim_shards("b", LONG_TTL, rebalance=False) == frozenset()

        # "a" holds more than its fair share but keeps it while not rebalancing,
        # and the renewal keeps "b" out past the first claim's expiry.
        assert await store.claim_shards("a", LONG_TTL, rebalance=False) == everything
        await asyncio.sleep(first.total_seconds() + 0.2)  # past the first claim's lease
        assert await other_store.claim_shards("b", LONG_TTL, rebalance=False) == frozenset()

        # Once "a" gives its surplus back, "b" takes the free shards even while
        # not rebalancing: taking is safe in the middle of a batch.
        a = await store.claim_shards("a", LONG_TTL)
        assert len(a) == store.shards // 2
        assert await other_store.claim_shards("b", LONG_TTL, rebalance=False) == everything - a

    # -- writing in the caller's transaction ---------------------------------------------

    async def _write_order(
        self, engine: AsyncEngine, store: OutboxStore, how: str, msg: OutboxMessage
    ) -> None:
        """Insert an order and an outbox row in one transaction of the given kind."""
        if how == "session":
            async with AsyncSession(engine) as session, session.begin():
                await session.execute(sa.insert(ORDERS).values(id=1, status="placed"))
                await store.add(session, [msg])
        else:
            async with engine.connect() as conn, conn.begin():
                await conn.execute(sa.insert(ORDERS).values(id=1, status="placed"))
                await store.add(conn, [msg])

    @staticmethod
    async def orders(engine: AsyncEngine) -> list[tuple[int, str]]:
        async with engine.connect() as conn:
            rows = await conn.execute(sa.select(ORDERS.c.id, ORDERS.c.status))
            return [tuple(r) for r in rows]

    @pytest.mark.parametrize("how", ["session", "connection"])
    async def test_state_change_and_outbox_row_commit_together(
        self, engine: AsyncEngine, store: OutboxStore, how: str
    ) -> None:
        placed = message(key=b"1", value=b"placed")

        await self._write_order(engine, store, how, placed)

        assert await self.orders(engine) == [(1, "placed")]
        assert self.ids(await self.fetch(store)) == [placed.message_id]

    @pytest.mark.parametrize("how", ["session", "connection"])
    async def test_state_change_and_outbox_row_vanish_together_on_rollback(
        self, engine: AsyncEngine, store: OutboxStore, how: str
    ) -> None:
        async def failing_write() -> None:
            if how == "session":
                async with AsyncSession(engine) as session, session.begin():
                    await session.execute(sa.insert(ORDERS).values(id=1, status="placed"))
                    await store.add(session, [message()])
                    raise Boom
            async with engine.connect() as conn, conn.begin():
                await conn.execute(sa.insert(ORDERS).values(id=1, status="placed"))
                await store.add(conn, [message()])
                raise Boom

        with pytest.raises(Boom):
            await failing_write()

        assert await self.orders(engine) == []
        assert await self.fetch(store) == []
        assert (await store.stats()).pending == 0

    @pytest.mark.parametrize("how", ["session", "connection"])
    async def test_on_commit_callback_runs_once_the_rows_are_committed(
        self, engine: AsyncEngine, store: OutboxStore, url: str, how: str
    ) -> None:
        """The relay is woken when it can see the rows, not before."""
        seen_at_callback: list[int] = []
        store.on_commit(lambda: seen_at_callback.append(self.committed_rows_seen_elsewhere(url)))

        await self._write_order(engine, store, how, message())

        assert seen_at_callback == [1]

    @pytest.mark.parametrize("how", ["session", "connection"])
    async def test_on_commit_callback_does_not_run_on_rollback(
        self, engine: AsyncEngine, store: OutboxStore, how: str
    ) -> None:
        calls: list[str] = []
        store.on_commit(lambda: calls.append("called"))

        with pytest.raises(Boom):
            if how == "session":
                async with AsyncSession(engine) as session, session.begin():
                    await store.add(session, [message()])
                    raise Boom
            else:
                async with engine.connect() as conn, conn.begin():
                    await store.add(conn, [message()])
                    raise Boom

        assert calls == []


class TestSqliteOutboxStore(OutboxStoreContract):
    @pytest.fixture
    def url(self, sqlite_url: str) -> str:
        return sqlite_url

    def create_store(self, engine: AsyncEngine, tables: OutboxTables) -> OutboxStore:
        return SqlOutboxStore(engine, tables)

    def committed_rows_seen_elsewhere(self, url: str) -> int:
        path = make_url(url).database
        assert path
        conn = sqlite3.connect(path, timeout=5)
        try:
            return int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
        finally:
            conn.close()

    async def test_reused_row_ids_are_fetched_and_marked_by_message_id(
        self, engine: AsyncEngine, store: OutboxStore
    ) -> None:
        """SQLite hands out the ids of deleted rows again; nothing may be lost or mismarked."""
        await self.add(engine, store, *(message(value=b"old") for _ in range(3)))
        old = await self.fetch(store)
        assert await store.mark_published(old) == 3
        await asyncio.sleep(0.01)
        assert await store.purge_published(timedelta(0), 100) == 3

        new_messages = [message(value=b"new") for _ in range(3)]
        await self.add(engine, store, *new_messages)
        new = await self.fetch(store)

        assert {m.id for m in new} & {m.id for m in old}, "the test needs a reused id"
        assert self.ids(new) == [m.message_id for m in new_messages]
        assert await store.mark_published(old) == 0  # stale rows sharing the new ids
        assert self.ids(await self.fetch(store)) == self.ids(new)
        assert await store.mark_published(new) == 3
        assert await self.fetch(store) == []


class TestPostgresOutboxStore(OutboxStoreContract):
    @pytest.fixture
    def url(self, postgres_url: str) -> str:
        return postgres_url

    def create_store(self, engine: AsyncEngine, tables: OutboxTables) -> OutboxStore:
        return SqlOutboxStore(engine, tables)

    def committed_rows_seen_elsewhere(self, url: str) -> int:
        libpq = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(libpq, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM outbox").fetchone()
            assert row is not None
            return int(row[0])

    async def test_a_batch_in_flight_across_a_restart_identity_marks_no_new_row(
        self, engine: AsyncEngine, store: OutboxStore
    ) -> None:
        """The outbox emptied with RESTART IDENTITY while a batch is in flight.

        The new rows take the in-flight rows' ids; the relay's mark (or
        delete) of the old batch must leave them pending, not drop them
        unpublished.
        """
        await self.add(engine, store, message(), message())
        in_flight = await self.fetch(store)
        async with engine.begin() as conn:
            await conn.execute(sa.text("TRUNCATE outbox RESTART IDENTITY"))
        fresh = [message(), message()]
        await self.add(engine, store, *fresh)
        assert {m.id for m in await self.fetch(store)} == {m.id for m in in_flight}

        assert await store.mark_published(in_flight) == 0
        assert await store.mark_published(in_flight, delete=True) == 0
        assert self.ids(await self.fetch(store)) == [m.message_id for m in fresh]

    async def test_the_read_ahead_leaves_out_rows_in_flight_up_to_the_largest_id(
        self, engine: AsyncEngine, store: OutboxStore
    ) -> None:
        """Rows in flight whose ids reach the largest bigint are still left out, not an error."""
        largest = 2**63 - 1
        async with engine.begin() as conn:
            await conn.execute(sa.text(f"ALTER SEQUENCE outbox_id_seq RESTART WITH {largest - 2}"))
        await self.add(engine, store, message(), message(), message())
        rows = await self.fetch(store)
        assert [m.id for m in rows] == [largest - 2, largest - 1, largest]

        in_flight = {m.id for m in rows[1:]}
        ahead = await store.fetch_due(set(range(store.shards)), 10, exclude=in_flight)
        assert self.ids(ahead) == self.ids(rows[:1])

    async def test_an_integer_id_column_is_read_ahead_past_rows_in_flight(
        self, engine: AsyncEngine, store: OutboxStore
    ) -> None:
        """An outbox made by a migration of one's own with an ``integer`` (serial) id works too."""
        async with engine.begin() as conn:
            await conn.execute(sa.text("ALTER TABLE outbox ALTER COLUMN id TYPE integer"))
        await self.add(engine, store, *(message() for _ in range(30)))
        rows = await self.fetch(store)
        every_shard = set(range(store.shards))

        for in_flight in (rows[:10], rows[:20:2]):  # a run (ranges), scattered ids (array)
            left_out = {m.id for m in in_flight}
            ahead = await store.fetch_due(every_shard, 100, exclude=left_out)
            assert self.ids(ahead) == [m.message_id for m in rows if m.id not in left_out]
        assert await store.mark_published(rows, delete=True) == len(rows)
        assert await self.fetch(store) == []

    async def test_row_committed_after_a_later_row_is_still_fetched(
        self, engine: AsyncEngine, store: OutboxStore
    ) -> None:
        """Commit-order inversion: a lower id committing late is never skipped."""
        early = message(key=b"t1", value=b"lower id, commits last")
        late = message(key=b"t2", value=b"higher id, commits first")
        async with engine.connect() as t1:
            await t1.begin()
            await store.add(t1, [early])
            await self.add(engine, store, late)  # T2, on its own connection

            first_round = await self.fetch(store)
            assert self.ids(first_round) == [late.message_id]
            assert await store.mark_published(first_round) == 1

            await t1.commit()

        second_round = await self.fetch(store)
        assert self.ids(second_round) == [early.message_id]
        assert second_round[0].id < first_round[0].id
        assert await store.mark_published(second_round) == 1
