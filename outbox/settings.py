"""Settings objects: Kafka connection, relay and inbox behaviour.

Each is a frozen, keyword-only dataclass validated on construction, so a bad
value fails where it is written rather than deep inside a running relay.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import timedelta
from types import MappingProxyType
from typing import Any, Literal

from outbox.errors import ConfigurationError
from outbox.retry import RetryPolicy

__all__ = ["InboxSettings", "KafkaSettings", "RelaySettings"]

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
# Options the runtime owns: letting a pass-through mapping change them would
# silently break a guarantee (offsets committed before the database commit).
_RESERVED_CONSUMER_OPTIONS = frozenset({"enable_auto_commit", "group_id", "bootstrap_servers"})
_RESERVED_PRODUCER_OPTIONS = frozenset({"bootstrap_servers"})


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True, kw_only=True)
class KafkaSettings:
    """How to reach Kafka, with safe defaults for producers and consumers.

    Build it in code, or from the conventional environment variables with
    :meth:`from_env`. Secrets never appear in ``repr()`` or logs.
    """

    bootstrap_servers: str = "localhost:9092"
    """Comma-separated ``host:port`` list of brokers to bootstrap from."""

    client_id: str = "choreosaga"
    """Client id sent to the broker (shows up in broker logs and quotas)."""

    security_protocol: SecurityProtocol = "PLAINTEXT"
    """``PLAINTEXT``, ``SSL``, ``SASL_PLAINTEXT`` or ``SASL_SSL``."""

    sasl_mechanism: str | None = None
    """``PLAIN``, ``SCRAM-SHA-256`` or ``SCRAM-SHA-512`` when a SASL protocol is used."""

    sasl_username: str | None = None
    """SASL user name."""

    sasl_password: str | None = field(default=None, repr=False)
    """SASL password; never shown in ``repr()``."""

    ssl_cafile: str | None = None
    """CA bundle used to verify the brokers' certificates (TLS protocols)."""

    ssl_certfile: str | None = None
    """Client certificate for mutual TLS."""

    ssl_keyfile: str | None = None
    """Private key of the client certificate."""

    enable_idempotence: bool = True
    """Idempotent producer: no duplicates or reordering from producer retries.

    Keep it on with Apache Kafka. Turn it off only for brokers that lack
    ``InitProducerId`` support (such as the embedded test broker).
    """

    acks: Literal["all", 1, 0] = "all"
    """Acknowledgements the producer waits for; ``"all"`` survives a leader loss."""

    linger_ms: int = 0
    """How long the producer waits to fill a batch before sending it.

    0 sends at once. Batching does not need a linger: the producer keeps one
    request in flight per broker, and what is sent meanwhile queues up into
    the next batch, so under load batches fill by themselves; at low load a
    linger only adds its full length to every hop of a saga (each hop is one
    relay send).
    """

    max_batch_size: int = 65_536
    """Most bytes of one record batch (aiokafka's ``max_batch_size``).

    The relay publishes a round's records of a partition in record batches of
    at most this size, one produce round trip each (see :mod:`outbox.kafka`):
    at 64 KiB a round of 500 small messages over 8 partitions takes one per
    partition where aiokafka's 16 KiB took two. Keep it within the broker's
    ``message.max.bytes`` (1 MiB by default on Apache Kafka).
    """

    request_timeout_ms: int = 30_000
    """How long a produce, fetch or admin request may take before it fails."""

    session_timeout_ms: int = 10_000
    """Consumer group session timeout; a silent member is evicted after it."""

    heartbeat_interval_ms: int = 3_000
    """Consumer heartbeat interval; must be below ``session_timeout_ms``."""

    fetch_max_wait_ms: int = 100
    """Longest time a fetch waits for data when none is there yet.

    Apache Kafka answers a waiting fetch as soon as data arrives, so this
    bounds only how often an idle consumer asks again (100 ms: ten requests a
    second per broker). Brokers that re-check for data on a timer instead
    answer late by up to this long: the embedded Tansu broker looks about
    every half of it, so :meth:`saga.EmbeddedBroker.kafka_settings` lowers it.
    """

    max_poll_records: int = 500
    """Most records one consumer poll returns."""

    producer_options: Mapping[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``aiokafka.AIOKafkaProducer`` (advanced)."""

    consumer_options: Mapping[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``aiokafka.AIOKafkaConsumer`` (advanced)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "producer_options", _frozen(self.producer_options))
        object.__setattr__(self, "consumer_options", _frozen(self.consumer_options))
        if not self.bootstrap_servers.strip():
            raise ConfigurationError("bootstrap_servers must name at least one broker")
        if self.security_protocol not in _SECURITY_PROTOCOLS:
            raise ConfigurationError(
                f"security_protocol must be one of {', '.join(_SECURITY_PROTOCOLS)}, "
                f"not {self.security_protocol!r}"
            )
        uses_sasl = self.security_protocol.startswith("SASL")
        if uses_sasl:
            if self.sasl_mechanism not in _SASL_MECHANISMS:
                raise ConfigurationError(
                    f"sasl_mechanism must be one of {', '.join(_SASL_MECHANISMS)} "
                    f"with {self.security_protocol}, not {self.sasl_mechanism!r}"
                )
            if not self.sasl_username or self.sasl_password is None:
                raise ConfigurationError("SASL needs sasl_username and sasl_password")
            if self.sasl_mechanism == "PLAIN" and self.security_protocol != "SASL_SSL":
                raise ConfigurationError(
                    "SASL PLAIN sends the password in clear text: use "
                    "security_protocol='SASL_SSL' (or a SCRAM mechanism)"
                )
        elif self.sasl_mechanism or self.sasl_username or self.sasl_password:
            raise ConfigurationError(
                f"SASL credentials given but security_protocol is {self.security_protocol}"
            )
        if self.acks not in ("all", 1, 0):
            raise ConfigurationError(f"acks must be 'all', 1 or 0, not {self.acks!r}")
        for name in _TUNING:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigurationError(f"{name} must be a non-negative integer, not {value!r}")
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ConfigurationError("heartbeat_interval_ms must be below session_timeout_ms")
        if self.max_poll_records < 1:
            raise ConfigurationError("max_poll_records must be at least 1")
        if self.max_batch_size < 1024:
            raise ConfigurationError(
                f"max_batch_size must be at least 1024 bytes, not {self.max_batch_size}"
            )
        reserved = _RESERVED_CONSUMER_OPTIONS & set(self.consumer_options)
        if reserved:
            raise ConfigurationError(
                f"consumer_options may not set {', '.join(sorted(reserved))}: "
                "the runtime owns these to keep its delivery guarantees"
            )
        reserved = _RESERVED_PRODUCER_OPTIONS & set(self.producer_options)
        if reserved:
            raise ConfigurationError(f"producer_options may not set {', '.join(sorted(reserved))}")

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if f.repr and f.name not in ("producer_options", "consumer_options")
        )
        secret = "'***'" if self.sasl_password is not None else "None"
        return f"KafkaSettings({shown}, sasl_password={secret})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> KafkaSettings:
        """Read settings from ``KAFKA_*`` environment variables.

        Recognised: ``KAFKA_BOOTSTRAP_SERVERS``, ``KAFKA_CLIENT_ID``,
        ``KAFKA_SECURITY_PROTOCOL``, ``KAFKA_SASL_MECHANISM``,
        ``KAFKA_SASL_USERNAME``, ``KAFKA_SASL_PASSWORD``, ``KAFKA_SSL_CAFILE``,
        ``KAFKA_SSL_CERTFILE``, ``KAFKA_SSL_KEYFILE``,
        ``KAFKA_ENABLE_IDEMPOTENCE`` (``true``/``false``), ``KAFKA_ACKS``
        (``all``, ``1`` or ``0``) and the tuning in milliseconds or counts:
        ``KAFKA_LINGER_MS``, ``KAFKA_REQUEST_TIMEOUT_MS``,
        ``KAFKA_SESSION_TIMEOUT_MS``, ``KAFKA_HEARTBEAT_INTERVAL_MS``,
        ``KAFKA_FETCH_MAX_WAIT_MS`` and ``KAFKA_MAX_POLL_RECORDS``. Keyword
        arguments override the environment.

        Raises:
            ConfigurationError: A variable has a value that cannot be used;
                the message names the variable.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in (
            "bootstrap_servers",
            "client_id",
            "security_protocol",
            "sasl_mechanism",
            "sasl_username",
            "sasl_password",
            "ssl_cafile",
            "ssl_certfile",
            "ssl_keyfile",
        ):
            raw = env.get(f"KAFKA_{name.upper()}")
            if raw:
                values[name] = raw
        idempotence = env.get("KAFKA_ENABLE_IDEMPOTENCE")
        if idempotence:
            values["enable_idempotence"] = parse_bool("KAFKA_ENABLE_IDEMPOTENCE", idempotence)
        acks = env.get("KAFKA_ACKS", "").strip().lower()
        if acks:
            if acks not in ("all", "1", "0"):
                raise ConfigurationError(f"KAFKA_ACKS must be all, 1 or 0, not {acks!r}")
            values["acks"] = "all" if acks == "all" else int(acks)
        for name in _TUNING:
            raw = env.get(f"KAFKA_{name.upper()}", "").strip()
            if raw:
                values[name] = _parse_count(f"KAFKA_{name.upper()}", raw)
        values.update(overrides)
        return cls(**values)

    def with_options(self, **changes: Any) -> KafkaSettings:
        """Return a copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def _common(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if self.security_protocol in ("SSL", "SASL_SSL"):
            context = ssl.create_default_context(cafile=self.ssl_cafile)
            if self.ssl_certfile:
                context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
            options["ssl_context"] = context
        if self.security_protocol.startswith("SASL"):
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = self.sasl_password
        return options

    def producer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``aiokafka.AIOKafkaProducer``."""
        options = self._common()
        options.update(
            acks=self.acks,
            enable_idempotence=self.enable_idempotence,
            linger_ms=self.linger_ms,
            max_batch_size=self.max_batch_size,
        )
        options.update(self.producer_options)
        return options

    def consumer_kwargs(self, group_id: str | None) -> dict[str, Any]:
        """Keyword arguments for ``aiokafka.AIOKafkaConsumer``.

        Auto-commit is always off: the runtime commits an offset only after
        the database transaction that processed the record has committed.
        """
        options = self._common()
        options.update(
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=self.session_timeout_ms,
            heartbeat_interval_ms=self.heartbeat_interval_ms,
            fetch_max_wait_ms=self.fetch_max_wait_ms,
            max_poll_records=self.max_poll_records,
        )
        options.update(self.consumer_options)
        return options

    def admin_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``aiokafka.admin.AIOKafkaAdminClient``."""
        return self._common()


_TUNING = (
    "linger_ms",
    "max_batch_size",
    "request_timeout_ms",
    "session_timeout_ms",
    "heartbeat_interval_ms",
    "fetch_max_wait_ms",
    "max_poll_records",
)
"""The integer fields of KafkaSettings that ``from_env`` reads as ``KAFKA_<NAME>``."""


def _parse_count(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigurationError(f"{name} must be a non-negative integer, not {raw!r}")
    return value


def parse_bool(name: str, raw: str) -> bool:
    """Parse a boolean environment value, refusing anything ambiguous."""
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigurationError(f"{name} must be true or false, not {raw!r}")


def _positive_duration(name: str, value: timedelta) -> None:
    if not isinstance(value, timedelta) or value <= timedelta(0):
        raise ConfigurationError(f"{name} must be a positive timedelta, not {value!r}")


MAX_BATCH_SIZE = 10_000
"""Most rows a relay round or a cleanup statement takes. A round's statements bind a
few parameters per row (its mark two, its read ahead one per row in flight, up to two
batches), and SQLite as built by default takes 32,766 parameters a statement."""


@dataclass(frozen=True, kw_only=True)
class RelaySettings:
    """How the relay reads, publishes, and cleans up the outbox."""

    batch_size: int = 500
    """Most rows read and published in one round (one mark statement each); at most
    :data:`MAX_BATCH_SIZE`."""

    poll_interval: timedelta = timedelta(seconds=1)
    """Fallback poll period when no wake-up (commit notification) arrives."""

    lease_ttl: timedelta = timedelta(seconds=10)
    """How long a relay's claim on a shard lasts without renewal.

    A relay that dies is replaced after this long; a relay that cannot renew
    in time stops publishing that shard.
    """

    backoff: RetryPolicy = field(
        default_factory=lambda: RetryPolicy(
            initial_interval=timedelta(milliseconds=100),
            maximum_interval=timedelta(seconds=5),
            maximum_attempts=0,
        )
    )
    """Backoff between attempts while the broker or database is unavailable."""

    retention: timedelta = timedelta(hours=1)
    """How long published rows are kept before cleanup deletes them.

    Zero keeps none: the statement that would mark a batch published deletes
    its rows instead. The relay's database work per row is then about half
    (``bench/relay_throughput.py --published both`` measures both), and the
    outbox holds only what is still to be published or parked;
    ``OutboxStore.stats().published`` stays at zero (the relay's own
    counters still count what it published).
    """

    cleanup_interval: timedelta = timedelta(minutes=1)
    """How often the relay deletes published rows older than ``retention``."""

    cleanup_batch_size: int = 1_000
    """Most rows one cleanup statement deletes (keeps locks short); at most
    :data:`MAX_BATCH_SIZE`."""

    startup_timeout: timedelta = timedelta(seconds=30)
    """How long :meth:`Relay.start` waits for an unreachable database or broker.

    Past it, start fails with the last error: at start, a server that never
    answers is more likely a wrong address than an outage. A misconfiguration
    (a missing database or table, a broker refusing the producer) fails at
    once. Once started, the relay waits out outages however long they last.
    """

    def __post_init__(self) -> None:
        for name in ("batch_size", "cleanup_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigurationError(f"{name} must be a whole number, not {value!r}")
            if not 1 <= value <= MAX_BATCH_SIZE:
                raise ConfigurationError(
                    f"{name} must be a whole number from 1 to {MAX_BATCH_SIZE}, not {value!r}"
                )
        for name in ("poll_interval", "lease_ttl", "cleanup_interval", "startup_timeout"):
            _positive_duration(name, getattr(self, name))
        if not isinstance(self.retention, timedelta) or self.retention < timedelta(0):
            raise ConfigurationError(
                f"retention must be zero or a positive timedelta, not {self.retention!r}"
            )
        if self.lease_ttl < timedelta(seconds=1):
            raise ConfigurationError("lease_ttl must be at least one second")


@dataclass(frozen=True, kw_only=True)
class InboxSettings:
    """How long processed message ids are remembered for deduplication."""

    retention: timedelta = timedelta(days=7)
    """How long an inbox row is kept. A redelivery older than this is not caught,
    so keep it longer than any replay or redelivery window you expect."""

    purge_interval: timedelta = timedelta(minutes=10)
    """How often the runtime purges inbox rows older than ``retention``."""

    purge_batch_size: int = 1_000
    """Most rows one purge statement deletes."""

    def __post_init__(self) -> None:
        _positive_duration("retention", self.retention)
        _positive_duration("purge_interval", self.purge_interval)
        if not isinstance(self.purge_batch_size, int) or self.purge_batch_size < 1:
            raise ConfigurationError("purge_batch_size must be a positive integer")
