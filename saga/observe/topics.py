"""Which topics the saga log reads: names matched against glob patterns."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from outbox import KafkaSettings
from saga.errors import BrokerError

__all__ = ["DEFAULT_PATTERNS", "matching_topics"]

DEFAULT_PATTERNS = ("saga.*",)
"""Saga topics under the default prefix (``ServiceSettings.saga_topic_prefix``)."""


async def matching_topics(kafka: KafkaSettings, patterns: Sequence[str]) -> list[str]:
    """Topics on the broker whose name matches one of ``patterns`` (``fnmatch`` globs).

    Listing, unlike describing, never creates a topic.
    """
    admin = AIOKafkaAdminClient(**kafka.admin_kwargs())
    try:
        await admin.start()
        names = await admin.list_topics()
    except KafkaError as exc:
        raise BrokerError(f"could not list the topics: {exc}") from exc
    finally:
        await admin.close()
    return sorted(
        name
        for name in names
        if not name.startswith("__") and any(fnmatch.fnmatchcase(name, p) for p in patterns)
    )
