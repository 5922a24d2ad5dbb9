"""The records of a real run are CloudEvents that the official Python SDK reads.

The reference shop runs on the real broker (SQLite databases) with one order
per scenario; every record of its saga topic is then read back and parsed
with ``cloudevents.core.bindings.kafka.from_binary``, which decodes every
Kafka header as UTF-8. Its attributes must agree with our headers, and the
stamp must come out of its ``sagastamp`` extension attribute.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from datetime import datetime, timedelta
from pathlib import Path

from cloudevents.core.bindings.kafka import KafkaMessage, from_binary
from cloudevents.core.formats.json import JSONFormat
from conftest import settings_for_tests
from support import read_topic

from saga import RelaySettings, ServiceSettings, ensure_topics
from saga.envelope import EnvelopeCodec
from saga.stamp import STAMP_SCHEMA, Stamp
from services import SAGA
from services.scenarios import Scenario, order_for
from services.shop import SERVICES, Shop


async def test_every_record_of_a_run_is_read_by_the_cloudevents_sdk(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    kafka = settings_for_tests(kafka_bootstrap)
    prefix = f"ce{uuid.uuid4().hex[:8]}."
    topic = prefix + SAGA
    await ensure_topics(kafka, {topic: 4})
    shop = Shop(
        urls={name: f"sqlite+aiosqlite:///{tmp_path / name}.db" for name in SERVICES},
        kafka=kafka,
        settings=ServiceSettings(
            saga_topic_prefix=prefix,
            group_prefix=prefix,
            relay=RelaySettings(poll_interval=timedelta(milliseconds=200)),
        ),
        deadline=timedelta(seconds=3),
        authorization_delay=timedelta(seconds=4),
    )
    orders = [order_for(scenario, number) for number, scenario in enumerate(Scenario)]
    await shop.setup()
    await shop.start()
    try:
        await asyncio.gather(*(shop.order.place(order) for order in orders))
        async with asyncio.timeout(60):
            await shop.wait_terminal(len(orders))
    finally:
        await shop.stop()
    records = await read_topic(kafka, topic, 3 * len(orders))

    codec = EnvelopeCodec(shop.codec)
    types = set()
    stamped = 0
    for record in records:
        headers = list(record.headers)
        assert all(isinstance(value, bytes) for _, value in headers)
        found = {name: value.decode("utf-8") for name, value in headers}  # all UTF-8 text
        assert "saga_stamp" not in found
        event = from_binary(
            KafkaMessage(headers=dict(headers), key=record.key, value=record.value),
            JSONFormat(),
        )
        assert event.get_specversion() == "1.0"
        assert event.get_id() == found["ce_id"]
        assert event.get_type() == found["ce_type"]
        assert event.get_source() == found["ce_source"]
        assert event.get_time() == datetime.fromisoformat(found["ce_time"])
        assert event.get_datacontenttype() == "application/avro"
        assert event.get_data() == record.value  # Avro is not text: the SDK keeps the bytes

        ours = codec.decode(record.key, record.value, record.headers)
        assert (event.get_id(), event.get_type(), event.get_source(), event.get_time()) == (
            ours.id,
            ours.type,
            ours.source,
            ours.time,
        )
        assert event.get_extension("correlationid") == ours.correlation_id
        assert event.get_extension("causationid") == ours.causation_id
        types.add(ours.type)
        extension = event.get_extension("sagastamp")
        if extension is None:
            assert ours.stamp is None
            continue
        _, record_of_stamp = shop.codec.decode(
            base64.b64decode(extension, validate=True), expected=STAMP_SCHEMA
        )
        stamp = Stamp.from_avro(record_of_stamp)
        assert stamp == ours.stamp
        assert event.get_subject() == stamp.saga_id
        assert record.key == stamp.saga_id.encode()
        stamped += 1

    assert stamped == len(records)  # every message of a saga carries its stamp
    assert {o.order_id for o in orders} <= {r.key.decode() for r in records if r.key}
    assert {
        "choreosaga.shop.OrderPlaced",
        "choreosaga.shop.StockReserved",
        "choreosaga.shop.PaymentCharged",
        "choreosaga.shop.ShipmentCreated",
        "choreosaga.saga.Compensate",
    } <= types
