"""A relay process for the fencing tests: ``python -P fencing_relay.py URL SERVERS NAME``.

(``-P``: the tests directory must not come first on the path, its ``outbox``
folder would hide the package.)

``FENCING_SEND_DELAY`` (seconds) slows every send, and each send appends
the message id to the file named by ``FENCING_SENT_LOG``, so that a test can
freeze the relay (SIGSTOP) in the middle of a batch. On SIGTERM it stops and
prints its stats as one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from datetime import timedelta

from outbox import (
    KafkaPublisher,
    KafkaSettings,
    OutboxTables,
    PublishError,
    Relay,
    RelaySettings,
    SqlOutboxStore,
    StoredMessage,
    create_engine,
)
from outbox.publisher import NotSentError


class SlowPublisher(KafkaPublisher):
    """Publishes like KafkaPublisher, one record at a time after a delay, logging each send.

    Record by record, so that the relay's send gate is asked before each one,
    and the relay can be frozen between two sends.
    """

    def __init__(self, settings: KafkaSettings, delay: float, sent_log: str | None) -> None:
        super().__init__(settings)
        self.delay = delay
        self.sent_log = sent_log

    async def publish(self, batch: Sequence[StoredMessage]) -> list[PublishError | None]:
        outcomes: list[PublishError | None] = []
        for message in batch:
            if outcomes and isinstance(outcomes[-1], NotSentError):
                outcomes.append(NotSentError())  # the gate closed: nothing more
                continue
            (outcome,) = await super().publish([message])
            outcomes.append(outcome)
            if isinstance(outcome, NotSentError):
                continue
            if self.sent_log:
                with open(self.sent_log, "a") as log:
                    log.write(message.message_id + "\n")
            await asyncio.sleep(self.delay)  # a slow relay: frozen, it is between two sends
        return outcomes


async def main(url: str, servers: str, name: str) -> None:
    settings = KafkaSettings(bootstrap_servers=servers, enable_idempotence=False, linger_ms=0)
    publisher = SlowPublisher(
        settings,
        float(os.environ.get("FENCING_SEND_DELAY", "0")),
        os.environ.get("FENCING_SENT_LOG"),
    )
    engine = create_engine(url)
    store = SqlOutboxStore(engine, OutboxTables(), shards=8)
    relay = Relay(
        store,
        publisher,
        RelaySettings(
            batch_size=50,
            lease_ttl=timedelta(seconds=2),
            poll_interval=timedelta(milliseconds=100),
        ),
        name=name,
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with relay:
        await stop.wait()
    await engine.dispose()
    print(json.dumps({"name": relay.name, "published": relay.stats.published}), flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(main(*sys.argv[1:4]))
