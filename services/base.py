"""What the four reference services have in common: a Service and its tables."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from saga import AvroCodec, KafkaSettings, OutboxTables, Service, ServiceSettings


class ShopService:
    """A reference service: its own tables next to the outbox, inbox and saga state.

    Args:
        name: Service name (also its consumer group).
        engine: The service's own database.
        kafka: Kafka settings.
        codec: Codec with the shop's schemas.
        settings: Runtime settings.
    """

    def __init__(
        self,
        name: str,
        *,
        engine: AsyncEngine,
        kafka: KafkaSettings,
        codec: AvroCodec,
        settings: ServiceSettings | None = None,
    ) -> None:
        self.engine = engine
        self.metadata = sa.MetaData()
        self.service = Service(
            name,
            engine=engine,
            kafka=kafka,
            codec=codec,
            settings=settings,
            tables=OutboxTables(self.metadata),
        )

    async def create_tables(self) -> None:
        """Create this service's tables (idempotent)."""
        async with self.engine.begin() as conn:
            await conn.run_sync(self.metadata.create_all)
        await self.service.create_tables()

    async def rows(self, table: sa.Table) -> list[sa.Row[tuple[object, ...]]]:
        """Every row of one of this service's tables (for checks and tests)."""
        async with self.engine.connect() as conn:
            return list((await conn.execute(sa.select(table))).all())
