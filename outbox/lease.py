"""Shard leases: which relay publishes which key-hash shard.

Per-key order with several relays needs exactly one publisher per key at a
time. Rows are spread over a fixed number of shards by key hash; each shard is
leased to one relay for a short time and renewed while the relay lives. A
relay that dies stops renewing and its shards pass to the others once the
lease runs out.

Relays also announce themselves in a membership table, so that each can
compute its fair share (``ceil(shards / live relays)``): a relay holding more
gives the surplus back, a relay holding fewer takes free or expired shards.
Every claim runs in one transaction that locks the lease rows (``FOR UPDATE``
on PostgreSQL, the write lock taken by ``BEGIN IMMEDIATE`` on SQLite), so two
relays never hold the same shard. All times come from the database clock.

Each lease carries an epoch, a fencing token bumped whenever a relay takes a
shard it did not hold. A relay marks rows only while the lease rows still show
its name and the epoch it took the shard with (see
:meth:`SqlOutboxStore.mark_published <outbox.store.SqlOutboxStore.mark_published>`),
so a relay that was paused past its lease while another took over marks nothing.
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from sqlalchemy import Table, delete, func, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from outbox.database import db_now_ms, require_configured, translate_db_error, upsert_insert
from outbox.errors import ConfigurationError
from outbox.tables import OutboxTables

__all__ = ["ShardLeases", "check_shard_count"]


async def check_shard_count(tx: AsyncConnection | AsyncSession, leases: Table, shards: int) -> bool:
    """Refuse a shard count other than the one the outbox was set up with.

    Writers and relays must agree, or one key's rows could land in two shards
    published by two relays at once. The lease rows record the count; returns
    whether they exist yet.

    Raises:
        ConfigurationError: The lease rows record another count.
    """
    existing = (await tx.execute(select(func.count()).select_from(leases))).scalar_one()
    if existing and existing != shards:
        raise ConfigurationError(
            f"this outbox is split into {existing} shards, not {shards}: every "
            "writer and relay of one outbox must use the same shard count"
        )
    return bool(existing)


class ShardLeases:
    """Claims, renews and releases a relay's share of the outbox shards.

    Args:
        engine: Database engine.
        tables: The outbox tables (leases and relays tables are used).
        shards: Total number of shards of the outbox.
        owner: Unique name of this relay instance.
        ttl: How long a claim lasts without renewal.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        tables: OutboxTables,
        *,
        shards: int,
        owner: str,
        ttl: timedelta,
    ) -> None:
        self.engine = engine
        self.tables = tables
        self.shards = shards
        self.owner = owner
        self.ttl = ttl
        self.ttl_ms = int(ttl.total_seconds() * 1000)
        self._dialect = require_configured(engine)
        self._created = False
        self.epochs: dict[int, int] = {}
        """Epoch of each shard this relay held at its last claim."""

    def _upsert(self, table: Table) -> Any:
        return upsert_insert(self._dialect)(table)

    async def _ensure_rows(self, conn: AsyncConnection) -> None:
        if self._created:
            return
        leases = self.tables.leases
        await check_shard_count(conn, leases, self.shards)
        statement = (
            self._upsert(leases)
            .values(
                [
                    {"shard": s, "owner": None, "expires_at_ms": 0, "epoch": 0}
                    for s in range(self.shards)
                ]
            )
            .on_conflict_do_nothing(index_elements=["shard"])
        )
        await conn.execute(statement)
        self._created = True

    async def claim(self, *, rebalance: bool = True) -> frozenset[int]:
        """Renew this relay's leases; return the shards it now holds.

        It also takes free or expired shards up to its fair share. With
        ``rebalance`` (the default) it gives back any surplus too; without it,
        it never gives a shard away: use that while a batch of the held shards
        is being published (taking a shard then is safe, giving one is not).
        """
        try:
            async with self.engine.begin() as conn:
                await self._ensure_rows(conn)
                return await self._claim(conn, rebalance=rebalance)
        except SQLAlchemyError as exc:
            raise translate_db_error(exc, "could not claim outbox shards") from exc

    async def _claim(self, conn: AsyncConnection, *, rebalance: bool) -> frozenset[int]:
        leases, relays = self.tables.leases, self.tables.relays
        now = (await conn.execute(select(db_now_ms()))).scalar_one()
        expires = now + self.ttl_ms
        query = select(
            leases.c.shard, leases.c.owner, leases.c.expires_at_ms, leases.c.epoch
        ).order_by(leases.c.shard)
        if self._dialect == "postgresql":
            query = query.with_for_update()
        rows = (await conn.execute(query)).all()

        # Heartbeat, forget relays gone for a while, count the live ones.
        await conn.execute(
            self._upsert(relays)
            .values(owner=self.owner, started_at_ms=now, expires_at_ms=expires)
            .on_conflict_do_update(index_elements=["owner"], set_={"expires_at_ms": expires})
        )
        await conn.execute(delete(relays).where(relays.c.expires_at_ms < now - self.ttl_ms))
        live = (
            await conn.execute(select(relays.c.owner).where(relays.c.expires_at_ms > now))
        ).all()
        fair_share = math.ceil(len(rows) / max(len(live), 1))

        mine = [r.shard for r in rows if r.owner == self.owner and r.expires_at_ms > now]
        free = [r.shard for r in rows if r.owner is None or r.expires_at_ms <= now]
        if len(mine) > fair_share and rebalance:
            surplus = mine[fair_share:]
            mine = mine[:fair_share]
            await conn.execute(
                update(leases)
                .where(leases.c.shard.in_(surplus), leases.c.owner == self.owner)
                .values(owner=None, expires_at_ms=0)
            )
        elif len(mine) < fair_share:
            mine += free[: fair_share - len(mine)]
        epochs = {r.shard: r.epoch for r in rows}
        # A shard taken from another relay (or given back and taken again)
        # gets a new epoch: whatever the former holder still has in flight
        # can no longer be marked. A relay renewing its own lease, even an
        # expired one nobody took, keeps its epoch.
        taken = [r.shard for r in rows if r.shard in mine and r.owner != self.owner]
        if mine:
            await conn.execute(
                update(leases)
                .where(leases.c.shard.in_(mine))
                .values(owner=self.owner, expires_at_ms=expires)
            )
        if taken:
            await conn.execute(
                update(leases).where(leases.c.shard.in_(taken)).values(epoch=leases.c.epoch + 1)
            )
            for shard in taken:
                epochs[shard] += 1
        self.epochs = {shard: epochs[shard] for shard in mine}
        return frozenset(mine)

    async def release(self) -> None:
        """Give back every shard and leave the membership (on clean shutdown)."""
        leases, relays = self.tables.leases, self.tables.relays
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    update(leases)
                    .where(leases.c.owner == self.owner)
                    .values(owner=None, expires_at_ms=0)
                )
                await conn.execute(delete(relays).where(relays.c.owner == self.owner))
            self.epochs = {}
        except SQLAlchemyError as exc:
            raise translate_db_error(exc, "could not release outbox shards") from exc

    async def holders(self) -> dict[int, str | None]:
        """Return the current owner of every shard (``None`` when free or expired)."""
        leases = self.tables.leases
        async with self.engine.connect() as conn:
            now = (await conn.execute(select(db_now_ms()))).scalar_one()
            rows = (await conn.execute(select(leases))).all()
        return {r.shard: (r.owner if r.expires_at_ms > now else None) for r in rows}
