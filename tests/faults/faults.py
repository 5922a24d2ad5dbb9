"""The faults, and a seeded schedule that injects them into a running cluster.

Every fault is a real signal or a real database action on a real process:

==========================  ==================================================
``kill_service``            SIGKILL a service instance at a random moment, restart it
``kill_relay``              SIGKILL a relay at a random moment, restart it
``crash_after_publish``     a relay dies between publishing a batch and marking it
``crash_after_commit``      a consumer dies after its database commit, before
                            its offset commit
``broker_pause``            SIGSTOP the broker for 3-30 s, then SIGCONT
``zombie_consumer``         SIGSTOP a service instance past its session timeout
                            (the group evicts it), then SIGCONT
``zombie_relay``            SIGSTOP a relay past its lease (another relay takes
                            its shards), then SIGCONT
``rebalance``               add a service instance mid-run
``pg_terminate``            ``pg_terminate_backend`` of one service's connections
``long_transaction``        an order placed in a transaction held open (the xmin
                            horizon, and an outbox id that commits late)
``pg_restart``              restart PostgreSQL (soak only, last, and only when no
                            other client uses the server)
==========================  ==================================================

The schedule starts one fault every ``interval`` seconds (with jitter); the
kinds are drawn from shuffled rounds of all kinds, so that a run of
``len(KINDS)`` faults or more injects every kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .cluster import LEASE_TTL, SESSION_TIMEOUT_MS, Cluster, Proc, wait_postgres

log = logging.getLogger(__name__)

KINDS = (
    "kill_service",
    "kill_relay",
    "crash_after_publish",
    "crash_after_commit",
    "broker_pause",
    "zombie_consumer",
    "zombie_relay",
    "rebalance",
    "pg_terminate",
)
"""The kinds the schedule draws from (the long transaction and the restart are extra)."""


@dataclass
class Fault:
    """One injected fault."""

    kind: str
    target: str
    started: float
    """Monotonic time the fault began."""
    ended: float = 0.0
    """Monotonic time the system was whole again (process back, broker resumed)."""
    detail: str = ""
    fired: bool = True
    """False for a crash point that was armed but not reached in time (disarmed)."""


@dataclass
class FaultLog:
    """Every fault of a run, in the order they started."""

    faults: list[Fault] = field(default_factory=list)

    def by_kind(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for f in self.faults:
            if f.fired:
                counts[f.kind] = counts.get(f.kind, 0) + 1
        return counts

    @property
    def ended(self) -> float:
        return max((f.ended for f in self.faults), default=0.0)


class Injector:
    """Injects faults into ``cluster`` on a seeded schedule.

    Args:
        cluster: The running processes.
        rng: The run's seeded random generator.
        broker_pause: Shortest and longest broker pause, in seconds.
        place_long: Places one order in a transaction held open for the given
            seconds (provided by the harness).
    """

    def __init__(
        self,
        cluster: Cluster,
        rng: random.Random,
        *,
        broker_pause: tuple[float, float],
        place_long: Callable[[float], Awaitable[str]],
    ) -> None:
        self.cluster = cluster
        self.rng = rng
        self.broker_pause = broker_pause
        self.place_long = place_long
        self.log = FaultLog()
        self._tasks: list[asyncio.Task[None]] = []

    # -- schedule -----------------------------------------------------------------

    def plan(self, count: int) -> list[str]:
        """``count`` kinds: shuffled rounds of every kind."""
        kinds: list[str] = []
        while len(kinds) < count:
            round_ = list(KINDS)
            self.rng.shuffle(round_)
            kinds += round_
        return kinds[:count]

    async def run(
        self, count: int, interval: float, *, long_hold: float, pg_restart: bool
    ) -> FaultLog:
        """Inject ``count`` faults, one every ``interval`` s; then the extras; wait for all."""
        if long_hold > 0:
            self._spawn(self._long_transaction(long_hold))
        for kind in self.plan(count):
            await asyncio.sleep(interval * self.rng.uniform(0.7, 1.3))
            self._spawn(self._inject(kind))
        await self.wait()
        if pg_restart:
            await self._pg_restart()
        return self.log

    def _spawn(self, work: Awaitable[None]) -> None:
        self._tasks.append(asyncio.ensure_future(work))

    async def wait(self) -> None:
        await asyncio.gather(*self._tasks)
        self._tasks.clear()

    async def cancel(self) -> None:
        """Stop injecting (an interrupted run); stopped processes are resumed by the cluster."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _inject(self, kind: str) -> None:
        action = getattr(self, f"_{kind}")
        try:
            await action()
        except Exception:
            log.exception("fault %s failed", kind)
            raise

    async def _pick(self, kind: str, wait: float = 30.0) -> Proc | None:
        """A process of ``kind`` that is up and not under a fault (waits for one)."""
        deadline = time.monotonic() + wait
        while (proc := self._choose(kind)) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        if proc is None:
            log.warning("no %s free for a fault in %.0f s", kind, wait)
        return proc

    def _choose(self, kind: str) -> Proc | None:
        choices = [
            p
            for p in self.cluster.procs
            if p.kind == kind and p.alive() and not p.busy and not p.stopped
        ]
        if kind == "service" and self.cluster.broker_paused:
            choices = []  # a restarted service could not set up while the broker sleeps
        return self.rng.choice(choices) if choices else None

    def _record(self, kind: str, target: str, detail: str = "") -> Fault:
        fault = Fault(kind=kind, target=target, started=time.monotonic(), detail=detail)
        self.log.faults.append(fault)
        log.info("fault %s on %s %s", kind, target, detail)
        return fault

    async def _restart(self, proc: Proc, fault: Fault) -> None:
        await asyncio.sleep(self.rng.uniform(0.3, 2.0))
        while proc.kind == "service" and self.cluster.broker_paused:
            await asyncio.sleep(0.2)  # starting needs the broker (topic check, group join)
        proc.start()
        if proc.kind == "service":
            await self._until_ready(proc)
        fault.ended = time.monotonic()
        proc.busy = False

    async def _until_ready(self, proc: Proc, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while not proc.ready():
            if not proc.alive():
                log.warning(
                    "%s exited while starting (status %s); starting it again",
                    proc.name,
                    proc.process.returncode if proc.process else None,
                )
                proc.kill()
                proc.start()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{proc.name} did not become ready in {timeout}s")
            await asyncio.sleep(0.1)

    # -- the faults ----------------------------------------------------------------

    async def _kill(self, kind: str, proc_kind: str) -> None:
        proc = await self._pick(proc_kind)
        if proc is None:
            return
        proc.busy = True
        fault = self._record(kind, proc.name)
        proc.kill()
        await self._restart(proc, fault)

    async def _kill_service(self) -> None:
        await self._kill("kill_service", "service")

    async def _kill_relay(self) -> None:
        await self._kill("kill_relay", "relay")

    async def _crash_at(self, kind: str, proc_kind: str, point: str) -> None:
        proc = await self._pick(proc_kind)
        if proc is None:
            return
        proc.busy = True
        fault = self._record(kind, proc.name, point)
        path = proc.arm(self.cluster.crash_dir, point)
        deadline = time.monotonic() + 20
        while proc.alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if proc.alive():  # never reached the point (nothing to do): disarm
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        if proc.alive():
            fault.fired = False
            fault.ended = time.monotonic()
            fault.detail += " (not reached in 20 s, disarmed)"
            proc.busy = False
            return
        proc.kill()  # reap; records -9
        fault.detail += f" (exit {proc.deaths[-1]})"
        await self._restart(proc, fault)

    async def _crash_after_publish(self) -> None:
        await self._crash_at("crash_after_publish", "relay", "relay.after_publish")

    async def _crash_after_commit(self) -> None:
        await self._crash_at("crash_after_commit", "service", "consumer.after_commit")

    async def _broker_pause(self) -> None:
        if self.cluster.broker_paused:
            return
        seconds = self.rng.uniform(*self.broker_pause)
        fault = self._record("broker_pause", "broker", f"{seconds:.1f} s")
        self.cluster.pause_broker()
        await asyncio.sleep(seconds)
        self.cluster.resume_broker()
        fault.ended = time.monotonic()

    async def _zombie(self, kind: str, proc_kind: str, past: float) -> None:
        proc = await self._pick(proc_kind)
        if proc is None:
            return
        proc.busy = True
        seconds = past + self.rng.uniform(1.5, 4.0)
        fault = self._record(kind, proc.name, f"{seconds:.1f} s")
        proc.signal(signal.SIGSTOP)
        await asyncio.sleep(seconds)
        proc.signal(signal.SIGCONT)
        fault.ended = time.monotonic()
        proc.busy = False

    async def _zombie_consumer(self) -> None:
        await self._zombie("zombie_consumer", "service", SESSION_TIMEOUT_MS / 1000)

    async def _zombie_relay(self) -> None:
        await self._zombie("zombie_relay", "relay", LEASE_TTL)

    async def _rebalance(self) -> None:
        service = self.rng.choice(["payment", "inventory", "shipping", "order"])
        while self.cluster.broker_paused:
            await asyncio.sleep(0.2)
        proc = self.cluster.add_instance(service)
        proc.busy = True
        fault = self._record("rebalance", proc.name, "instance added")
        await self._until_ready(proc)
        fault.ended = time.monotonic()
        proc.busy = False

    async def _pg_terminate(self) -> None:
        service = self.rng.choice(["order", "inventory", "payment", "shipping"])
        fault = self._record("pg_terminate", service)
        terminated = await asyncio.to_thread(self.cluster.databases.terminate, service)
        fault.detail = f"{terminated} connections"
        fault.ended = time.monotonic()

    async def _long_transaction(self, hold: float) -> None:
        fault = self._record("long_transaction", "order db", f"held {hold:.0f} s")
        order_id = await self.place_long(hold)
        fault.detail += f", {order_id}"
        fault.ended = time.monotonic()

    async def _pg_restart(self) -> None:
        others = await asyncio.to_thread(self.cluster.databases.foreign_clients)
        if others:
            fault = self._record("pg_restart", "postgresql", f"skipped: {others} other clients")
            fault.fired = False
            fault.ended = time.monotonic()
            return
        fault = self._record("pg_restart", "postgresql")
        version = _cluster_version()
        done = await asyncio.to_thread(
            subprocess.run,
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
            capture_output=True,
            text=True,
            check=False,
        )
        fault.detail = f"pg_ctlcluster {version} main restart: exit {done.returncode}"
        await asyncio.to_thread(wait_postgres, 60.0)
        fault.ended = time.monotonic()


def _cluster_version() -> str:
    versions = sorted(os.listdir("/etc/postgresql"))
    return versions[-1] if versions else "15"
