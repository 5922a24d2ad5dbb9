"""Commit notifications that wake the relay without waiting for its next poll.

On PostgreSQL, writers send ``NOTIFY <outbox>_committed`` inside their
transaction; the server delivers it only when (and if) the transaction
commits. :class:`PostgresCommitListener` holds one ``LISTEN`` connection per
relay and reconnects with backoff when it drops. A lost notification only
costs latency: the relay still polls. The connection is made from the
engine's URL alone (not its ``connect_args`` or connection hooks); where that
cannot connect, the relay still works, by polling.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import psycopg
from psycopg import sql
from sqlalchemy.engine import URL

from outbox.retry import RetryPolicy

__all__ = ["PostgresCommitListener"]

log = logging.getLogger(__name__)


class PostgresCommitListener:
    """Calls ``callback`` whenever a NOTIFY arrives on ``channel``.

    Args:
        url: SQLAlchemy URL of the database (the driver part is ignored).
        channel: Channel name (exact, case-sensitive).
        callback: Called on every notification, and after every (re)connect
            so that commits made while disconnected are not waited for.
        backoff: Wait between reconnection attempts.
    """

    def __init__(
        self,
        url: URL,
        channel: str,
        callback: Callable[[], None],
        *,
        backoff: RetryPolicy | None = None,
    ) -> None:
        self._conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._channel = channel
        self._callback = callback
        self._backoff = backoff or RetryPolicy(maximum_attempts=0)
        self.connected = asyncio.Event()

    async def run(self) -> None:
        """Listen until cancelled, reconnecting after errors."""
        attempt = 0
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
                try:
                    listen = sql.SQL("LISTEN {}").format(sql.Identifier(self._channel))
                    await conn.execute(listen)
                    attempt = 0
                    self.connected.set()
                    self._callback()
                    async for _ in conn.notifies():
                        self._callback()
                finally:
                    self.connected.clear()
                    await conn.close()
            except (psycopg.Error, OSError) as exc:
                attempt += 1
                delay = self._backoff.delay(attempt)
                log.warning(
                    "outbox commit listener lost its connection (%s); retry in %.1fs", exc, delay
                )
                await asyncio.sleep(delay)
