"""Listing and replaying dead letters (``saga dlq list`` and ``saga dlq replay``).

A dead letter (:mod:`saga.deadletter`) keeps the original record byte for
byte. Replaying sends the original key, value and headers back to the
original topic, with a ``dlq_replay`` header naming the dead letter and a
``dlq_replay_group`` header naming the consumer group that failed (the other
groups reading that topic skip it), once a person has fixed what made it
fail. Replays are sent one at a time, in dead-letter order, each
acknowledged before the next: a key's records go back in the order they
failed. The consumer's inbox makes a replay apply at
most once (replaying the same dead letter twice changes nothing the second
time), and a suspended saga whose message is replayed continues from the
step where it stopped.

Reading a topic to its end: this works with any Kafka broker, including ones
whose ``end_offsets`` are unreliable, by reading until every partition's
position reached the high watermark its last fetch reported.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from outbox import KafkaSettings
from outbox.kafka import idempotence_refused
from saga.commands import broker_list
from saga.deadletter import REPLAY_GROUP_HEADER, REPLAY_HEADER, DeadLetter
from saga.errors import BrokerError, ConfigurationError
from saga.observe.topics import matching_topics

__all__ = ["DeadLetterSelection", "dead_letter_topics", "read_dead_letters", "replay"]

DLQ_SUFFIX = ".dlq"


_REF = re.compile(r"(?:(?P<topic>[A-Za-z0-9._-]+)/(?P<partition>[0-9]+)/)?(?P<offset>[0-9]+)")
"""A dead-letter reference: ``<dlq topic>/<partition>/<offset>`` (a Kafka topic
name never holds a ``/``), or an ``<offset>`` in any dead-letter topic."""

_REF_FORM = "TOPIC/PARTITION/OFFSET (as 'saga dlq list' prints it) or OFFSET"
"""How a dead-letter reference is written, for messages."""


@dataclass(frozen=True, kw_only=True)
class DeadLetterSelection:
    """Which dead letters to act on; every given criterion must match."""

    saga_id: str | None = None
    """Only dead letters of this saga."""

    error: str | None = None
    """Only errors of this type: a class name (``KeyError``) or qualified name."""

    topic: str | None = None
    """Only dead letters from this original topic."""

    refs: frozenset[str] = frozenset()
    """Only these dead letters, by ``<dlq topic>/<partition>/<offset>`` or ``<offset>``."""

    def __post_init__(self) -> None:
        for ref in sorted(self.refs):
            if _REF.fullmatch(ref) is None:
                raise ConfigurationError(f"not a dead-letter reference: {ref!r}; give {_REF_FORM}")

    def matches(self, letter: DeadLetter) -> bool:
        """Whether ``letter`` is selected."""
        if self.saga_id is not None and letter.saga_id != self.saga_id:
            return False
        if self.error is not None:
            qualified = letter.error_type
            if self.error not in (qualified, qualified.rsplit(".", 1)[-1]):
                return False
        if self.topic is not None and letter.original_topic != self.topic:
            return False
        return not self.refs or any(_refers_to(ref, letter) for ref in self.refs)

    @property
    def empty(self) -> bool:
        """Whether nothing narrows the selection (it would select everything)."""
        return self.saga_id is None and self.error is None and self.topic is None and not self.refs


def _refers_to(ref: str, letter: DeadLetter) -> bool:
    """Whether the reference ``ref`` names ``letter`` (``False`` for a malformed one)."""
    parsed = _REF.fullmatch(ref)
    if parsed is None or int(parsed["offset"]) != letter.offset:
        return False
    if parsed["topic"] is None:
        return True
    return (parsed["topic"], int(parsed["partition"])) == (letter.topic, letter.partition)


async def dead_letter_topics(settings: KafkaSettings, suffix: str = DLQ_SUFFIX) -> list[str]:
    """Topics on the broker whose name ends with ``suffix`` (the default dead-letter topics)."""
    return await matching_topics(settings, [f"*{suffix}"])


async def read_dead_letters(
    settings: KafkaSettings,
    topics: Iterable[str] | None = None,
    *,
    selection: DeadLetterSelection | None = None,
    max_seconds: float = 30.0,
    progress: Callable[[int], None] | None = None,
) -> list[DeadLetter]:
    """Read every dead letter of ``topics`` (default: every ``*.dlq`` topic), oldest first.

    Raises:
        BrokerError: The broker could not be read within ``max_seconds``.
    """
    names = sorted(set(topics)) if topics is not None else await dead_letter_topics(settings)
    selection = selection or DeadLetterSelection()
    if not names:
        return []
    kwargs = settings.consumer_kwargs(None)
    kwargs.update(enable_auto_commit=False, fetch_max_wait_ms=100)
    consumer = AIOKafkaConsumer(**kwargs)
    letters: list[DeadLetter] = []
    try:
        await consumer.start()
        partitions = [
            TopicPartition(name, p)
            for name in names
            for p in sorted(consumer.partitions_for_topic(name) or ())
        ]
        if not partitions:
            return []
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        deadline = time.monotonic() + max_seconds
        while True:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for record in records:
                    letter = DeadLetter.from_record(
                        topic=record.topic,
                        partition=record.partition,
                        offset=record.offset,
                        key=record.key,
                        value=record.value,
                        headers=record.headers,
                        timestamp_ms=record.timestamp,
                    )
                    if selection.matches(letter):
                        letters.append(letter)
            if progress is not None:
                progress(len(letters))
            if await _at_end(consumer, partitions):
                break
            if time.monotonic() > deadline:
                raise BrokerError(f"could not read {', '.join(names)} to the end in {max_seconds}s")
    except KafkaError as exc:
        raise BrokerError(f"could not read dead letters: {exc}") from exc
    finally:
        await consumer.stop()
    letters.sort(key=lambda d: (d.timestamp, d.topic, d.partition, d.offset))
    return letters


async def _at_end(consumer: AIOKafkaConsumer, partitions: Sequence[TopicPartition]) -> bool:
    for tp in partitions:
        highwater = consumer.highwater(tp)
        if highwater is None or await consumer.position(tp) < highwater:
            return False
    return True


async def replay(
    settings: KafkaSettings,
    letters: Sequence[DeadLetter],
    *,
    dry_run: bool = False,
) -> list[DeadLetter]:
    """Send ``letters`` back to their original topics, in order; return what was sent.

    Each record goes out with its original key, value and headers and a
    ``dlq_replay`` header, and is acknowledged before the next is sent, so
    per-key order is kept. With ``dry_run`` nothing is sent.

    Raises:
        ConfigurationError: A dead letter does not name its original topic.
        BrokerError: The broker refused or could not be reached.
    """
    for letter in letters:
        if not letter.original_topic:
            raise ConfigurationError(f"dead letter {letter.ref} does not name its original topic")
    if dry_run or not letters:
        return list(letters)
    producer = AIOKafkaProducer(**settings.producer_kwargs())
    started = False
    try:
        await producer.start()
        started = True
        for letter in letters:
            replayed = (REPLAY_HEADER, REPLAY_GROUP_HEADER)
            headers = [(n, v) for n, v in letter.headers if n not in replayed]
            headers.append((REPLAY_HEADER, letter.ref.encode()))
            if letter.info.get("group"):
                headers.append((REPLAY_GROUP_HEADER, letter.info["group"].encode()))
            await producer.send_and_wait(
                letter.original_topic, value=letter.value, key=letter.key, headers=headers
            )
    except (TimeoutError, KafkaError) as exc:
        refused = None if started else idempotence_refused(settings, exc)
        raise BrokerError(refused or f"could not replay dead letters: {exc}") from exc
    finally:
        await producer.stop()
    return list(letters)


# -- command line: ``saga dlq`` -----------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``saga dlq list`` and ``saga dlq replay`` to the ``saga`` command."""
    p = sub.add_parser(
        "dlq",
        help="list dead letters, or replay them once the cause is fixed",
        description="Records a service could not process (a handler bug, bad input) are kept "
        "byte for byte on a dead-letter topic (<topic>.dlq by default) with the error, and "
        "their saga is suspended at that step. List them; fix the code; replay them: they go "
        "back to their original topic and the saga continues where it stopped.",
    )
    actions = p.add_subparsers(dest="action", required=True)
    for name, text in (
        ("list", "list dead letters (no payloads: sizes and hashes)"),
        ("replay", "send dead letters back to their original topic"),
    ):
        a = actions.add_parser(name, help=text, description=text)
        a.add_argument(
            "refs",
            nargs="*",
            help="dead letters by TOPIC/PARTITION/OFFSET (as listed) or OFFSET; "
            "one that names no dead letter is reported and makes the exit status 1",
        )
        a.add_argument("--saga", dest="saga_id", help="only dead letters of this saga id")
        a.add_argument("--error", help="only this error type (KeyError or builtins.KeyError)")
        a.add_argument("--topic", help="only dead letters from this original topic")
        a.add_argument(
            "--dlq-topic",
            action="append",
            dest="dlq_topics",
            help="dead-letter topic to read (repeatable; default: every *.dlq topic)",
        )
        a.add_argument(
            "--bootstrap-servers",
            type=broker_list,
            default=None,
            help="Kafka brokers (default: $KAFKA_BOOTSTRAP_SERVERS, then localhost:9092)",
        )
        a.add_argument("--json", action="store_true", help="print JSON")
        if name == "replay":
            a.add_argument("--dry-run", action="store_true", help="show what would be sent")
            a.add_argument(
                "--all", action="store_true", help="replay every dead letter (no selection)"
            )


async def run(args: argparse.Namespace) -> int:
    """Run ``saga dlq``; return the exit status."""
    kafka = KafkaSettings.from_env(
        **({"bootstrap_servers": args.bootstrap_servers} if args.bootstrap_servers else {})
    )
    selection = DeadLetterSelection(
        saga_id=args.saga_id, error=args.error, topic=args.topic, refs=frozenset(args.refs)
    )
    if args.action == "replay" and selection.empty and not args.all:
        raise ConfigurationError(
            "say which dead letters to replay (offsets, --saga, --error, --topic) or --all"
        )
    letters = await read_dead_letters(kafka, args.dlq_topics, selection=selection)
    # A reference that names nothing is most likely a typo: say so, and fail,
    # after acting on the ones that were found (as ``saga outbox retry`` does).
    missing = [r for r in dict.fromkeys(args.refs) if not any(_refers_to(r, d) for d in letters)]
    if args.action == "list":
        _print_letters(letters, as_json=args.json)
    else:
        sent = await replay(kafka, letters, dry_run=args.dry_run)
        verb = "would replay" if args.dry_run else "replayed"
        if args.json:
            print(json.dumps({verb.replace(" ", "_"): [d.to_json() for d in sent]}, indent=2))
        else:
            for letter in sent:
                print(f"{verb} {letter.ref} -> {letter.original_topic}  {_describe(letter)}")
            print(f"{verb} {len(sent)} dead letter(s)")
    options = (("--saga", args.saga_id), ("--error", args.error), ("--topic", args.topic))
    given = [option for option, value in options if value is not None]
    also = f" matching {' and '.join(given)}" if given else ""
    for ref in missing:
        print(f"saga dlq: no dead letter {ref}{also}", file=sys.stderr)
    return 1 if missing else 0


def _describe(letter: DeadLetter) -> str:
    info = letter.info
    saga = f"saga {info['saga_name']}/{info['saga_id']}" if "saga_id" in info else "no saga"
    role, step = info.get("role", "?"), info.get("step")
    if role == "step" and step:
        what = f"step {step}"
    elif role == "compensation" and step:
        what = f"compensation of {step}"
    elif role == "decode":
        what = "undecodable record"
    else:
        what = f"{role} handler"
    return (
        f"{what} in {info.get('service', '?')}, {saga}: "
        f"{letter.error_type.rsplit('.', 1)[-1]}: {info.get('error_message', '')}"
    )


def _print_letters(letters: Sequence[DeadLetter], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps([d.to_json() for d in letters], indent=2))
        return
    if not letters:
        print("no dead letters")
        return
    for letter in letters:
        info = letter.info
        print(
            f"{letter.ref}  {letter.timestamp.isoformat(timespec='seconds')}  "
            f"from {info.get('topic', '?')}[{info.get('partition', '?')}]@"
            f"{info.get('offset', '?')}  attempts={info.get('attempts', '?')}  "
            f"{letter.header('ce_type') or '-'} {letter.header('ce_id') or '-'}\n"
            f"    {_describe(letter)}"
        )
    print(f"{len(letters)} dead letter(s)")
