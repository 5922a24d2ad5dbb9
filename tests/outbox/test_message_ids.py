"""Message ids: unique, and led by the time so the inbox and outbox indexes grow at one edge."""

from __future__ import annotations

import time
import uuid

from outbox import OutboxMessage
from outbox.message import time_ordered_id
from saga.envelope import Envelope


def test_ids_are_rfc_9562_version_7_carrying_the_time_they_were_made() -> None:
    before = time.time_ns() // 1_000_000
    made = uuid.UUID(time_ordered_id())
    after = time.time_ns() // 1_000_000
    assert made.version == 7
    assert made.variant == uuid.RFC_4122
    assert before <= made.int >> 80 <= after


def test_ids_made_later_sort_after_earlier_ones_as_text() -> None:
    earlier = [time_ordered_id() for _ in range(100)]
    time.sleep(0.002)
    later = [time_ordered_id() for _ in range(100)]
    assert max(earlier) < min(later)


def test_ids_do_not_collide_within_a_millisecond() -> None:
    ids = [time_ordered_id() for _ in range(200_000)]
    assert len(set(ids)) == len(ids)


def test_outbox_rows_and_envelopes_get_time_ordered_ids_by_default() -> None:
    message = OutboxMessage(topic="orders", value=b"x")
    envelope = Envelope(type="example.Thing", source="/svc", data={})
    assert uuid.UUID(message.message_id).version == 7
    assert uuid.UUID(envelope.id).version == 7
