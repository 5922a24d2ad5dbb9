"""The reference shop as separate processes: broker, services, relays, databases.

Each service (``python -m services NAME``) and each relay (``saga relay``) is
its own OS process, in a session of its own, so that a signal reaches that
process alone. Every process gets a database ``application_name`` naming it
(``fault-svc-<service>`` for services and their relays), so that
``pg_terminate_backend`` can aim at one service's connections and spare the
harness's own. The broker is a private embedded Tansu (memory storage): it is
paused and resumed, never restarted (a restart forgets every topic and group).

Crash points (:mod:`outbox.crashpoints`) are enabled in every child by
``CHOREOSAGA_CRASH_POINTS``; :meth:`Proc.arm` arms one process at one point.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from outbox.crashpoints import CRASH_POINTS_VARIABLE, arm
from saga.embedded import EmbeddedBroker
from services.shop import SERVICES

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"

SESSION_TIMEOUT_MS = 2000
"""Consumer session timeout of every service: a stopped consumer is evicted after it."""

LEASE_TTL = 2.0
"""Shard lease of every relay, in seconds: a stopped relay loses its shards after it."""


def server_url() -> str:
    """libpq URL of the PostgreSQL server (``TEST_POSTGRES_URL`` or the local one)."""
    url = os.environ.get("TEST_POSTGRES_URL", DEFAULT_SERVER)
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class Databases:
    """One fresh database per service, dropped at the end."""

    def __init__(self, run: str) -> None:
        self.server = server_url()
        self.names = {name: f"csfault_{run}_{name}" for name in SERVICES}

    def create(self) -> None:
        """Create the four databases."""
        with psycopg.connect(self.server, autocommit=True, connect_timeout=5) as conn:
            for name in self.names.values():
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def url(self, service: str, application: str) -> str:
        """SQLAlchemy URL of ``service``'s database, for the client ``application``."""
        return (
            make_url(self.server)
            .set(drivername="postgresql+psycopg", database=self.names[service])
            .update_query_dict({"application_name": application})
            .render_as_string(hide_password=False)
        )

    def terminate(self, service: str) -> int:
        """``pg_terminate_backend`` every connection of ``service`` (its processes and relays)."""
        with psycopg.connect(self.server, autocommit=True, connect_timeout=5) as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND application_name LIKE %s AND pid <> pg_backend_pid()",
                (self.names[service], f"fault-svc-{service}%"),
            ).fetchall()
        return sum(1 for (done,) in rows if done)

    def foreign_clients(self) -> int:
        """Client connections to databases other than this run's (other users of the server)."""
        with psycopg.connect(self.server, autocommit=True, connect_timeout=5) as conn:
            (count,) = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                "AND pid <> pg_backend_pid() AND datname IS NOT NULL "
                "AND NOT (datname = ANY(%s))",
                (list(self.names.values()),),
            ).fetchone() or (0,)
        return int(count)

    def drop(self) -> None:
        """Drop the four databases (FORCE: a leftover connection does not keep one alive)."""
        with psycopg.connect(self.server, autocommit=True, connect_timeout=10) as conn:
            for name in self.names.values():
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )


def wait_postgres(timeout: float) -> None:
    """Wait until the server accepts connections again (after a restart)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(server_url(), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@dataclass
class Proc:
    """A service instance or a relay, restartable under a new generation."""

    name: str
    kind: str
    """``service`` or ``relay``."""
    service: str
    argv: list[str]
    env: dict[str, str]
    logs: Path
    generation: int = 0
    process: subprocess.Popen[bytes] | None = None
    stopped: bool = False
    """SIGSTOPped right now."""
    busy: bool = False
    """A fault is acting on it right now."""
    deaths: list[int] = field(default_factory=list)
    """Return codes of earlier generations."""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start (or restart) the process; a relay gets a fresh name per generation."""
        self.generation += 1
        argv = list(self.argv)
        if self.kind == "relay":
            argv += ["--name", f"{self.name}.{self.generation}"]
        ready = self.env.get("READY_FILE")
        if ready:
            Path(ready).unlink(missing_ok=True)
        with open(self.logs / f"{self.name}.log", "ab") as log:
            log.write(f"--- generation {self.generation}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                argv,
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.stopped = False

    def ready(self) -> bool:
        ready = self.env.get("READY_FILE")
        return self.alive() and (ready is None or Path(ready).exists())

    def signal(self, signum: signal.Signals) -> None:
        if self.alive():
            os.kill(self.pid, signum)
        self.stopped = signum is signal.SIGSTOP

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.deaths.append(self.process.wait())
        self.stopped = False

    def arm(self, directory: Path, point: str) -> str:
        return arm(str(directory), point, self.pid)

    def terminate(self, timeout: float = 20.0) -> int | None:
        """SIGCONT, SIGTERM, wait, then SIGKILL; return the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
            os.kill(self.pid, signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


class Cluster:
    """Broker, databases, services and relays of one run.

    Args:
        workdir: Logs, ready files and armed crash points go here.
        deadline: Saga deadline of the order service, in seconds.
        authorization_delay: How late slow cards answer, in seconds.
        relays: Relay processes per service.
        instances: Service instances per service (one consumer group each).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        deadline: float,
        authorization_delay: float,
        relays: dict[str, int],
        instances: dict[str, int],
    ) -> None:
        self.run = uuid.uuid4().hex[:8]
        self.workdir = workdir
        self.crash_dir = workdir / "crash-points"
        self.crash_dir.mkdir(parents=True, exist_ok=True)
        self.logs = workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.prefix = f"f{self.run}."
        self.deadline = deadline
        self.authorization_delay = authorization_delay
        self.databases = Databases(self.run)
        self.broker = EmbeddedBroker(log_path=workdir / "broker.log")
        self.broker_paused = False
        self.procs: list[Proc] = []
        self._relays = relays
        self._instances = instances

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap_servers

    def base_env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("KAFKA_", "DATABASE_URL", "PYTEST_"))
        }
        env.update(
            KAFKA_BOOTSTRAP_SERVERS=self.bootstrap,
            KAFKA_ENABLE_IDEMPOTENCE="false",
            KAFKA_SESSION_TIMEOUT_MS=str(SESSION_TIMEOUT_MS),
            KAFKA_HEARTBEAT_INTERVAL_MS="300",
            KAFKA_FETCH_MAX_WAIT_MS="10",
            KAFKA_REQUEST_TIMEOUT_MS="10000",
            KAFKA_LINGER_MS="2",
            SAGA_TOPIC_PREFIX=self.prefix,
            SAGA_TOPIC_PARTITIONS="4",
            RUN_RELAY="false",
            ORDER_DEADLINE_SECONDS=str(self.deadline),
            AUTHORIZATION_DELAY_SECONDS=str(self.authorization_delay),
            PYTHONUNBUFFERED="1",
        )
        env[CRASH_POINTS_VARIABLE] = str(self.crash_dir)
        return env

    def service_proc(self, service: str, number: int) -> Proc:
        name = f"{service}-{number}"
        env = self.base_env()
        env["DATABASE_URL"] = self.databases.url(service, f"fault-svc-{service}-{number}")
        env["READY_FILE"] = str(self.workdir / f"{name}.ready")
        argv = [sys.executable, "-m", "services", service]
        return Proc(name, "service", service, argv, env, self.logs)

    def relay_proc(self, service: str, number: int) -> Proc:
        name = f"relay-{service}-{number}"
        env = self.base_env()
        url = self.databases.url(service, f"fault-svc-{service}-relay-{number}")
        argv = [sys.executable, "-m", "saga", "relay", "--database-url", url]
        argv += ["--shards", "16", "--batch-size", "100", "--lease-ttl", str(LEASE_TTL)]
        argv += ["--poll-interval", "0.2", "--stats-json"]  # counters land in its log
        return Proc(name, "relay", service, argv, env, self.logs)

    def start(self, timeout: float = 60.0) -> None:
        """Start the broker, create the databases, start services, then relays."""
        self.broker.start()
        self.databases.create()
        services = [
            self.service_proc(s, n) for s in SERVICES for n in range(1, self._instances[s] + 1)
        ]
        # The first instance of each service creates its tables; the others
        # start once it is ready (set-up takes an advisory lock anyway).
        for proc in services:
            proc.start()
        self.procs.extend(services)
        self.wait_ready(services, timeout)
        relays = [self.relay_proc(s, n) for s in SERVICES for n in range(1, self._relays[s] + 1)]
        for proc in relays:
            proc.start()
        self.procs.extend(relays)

    def add_instance(self, service: str) -> Proc:
        """Start one more instance of ``service`` (its group rebalances)."""
        number = 1 + sum(1 for p in self.procs if p.kind == "service" and p.service == service)
        proc = self.service_proc(service, number)
        proc.start()
        self.procs.append(proc)
        return proc

    def wait_ready(self, procs: list[Proc], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        restarts = 0
        while not all(p.ready() for p in procs):
            dead = [p for p in procs if not p.alive()]
            if dead and restarts < 5:
                # A full server ("too many clients") fails a set-up; try again.
                restarts += 1
                for proc in dead:
                    proc.kill()
                    proc.start()
                continue
            if dead or time.monotonic() > deadline:
                raise RuntimeError(
                    f"processes not ready: {[p.name for p in procs if not p.ready()]} "
                    f"(dead: {[p.name for p in dead]}); see {self.logs}"
                )
            time.sleep(0.1)

    def pause_broker(self) -> None:
        self.broker.pause()
        self.broker_paused = True

    def resume_broker(self) -> None:
        self.broker.resume()
        self.broker_paused = False

    def stop(self) -> dict[str, int | None]:
        """Stop every process (relays first), the broker; return the exit statuses."""
        if self.broker_paused:
            self.resume_broker()
        statuses = {}
        for proc in self.procs:
            if proc.alive():
                proc.signal(signal.SIGCONT)  # a zombie left stopped by an interrupted run
        for proc in sorted(self.procs, key=lambda p: p.kind != "relay"):
            statuses[proc.name] = proc.terminate()
        self.broker.stop()
        return statuses

    def drop(self) -> None:
        self.databases.drop()
