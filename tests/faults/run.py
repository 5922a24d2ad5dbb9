"""``python -m tests.faults.run``: a seeded fault-injection run that prints a table.

Runs the reference saga with its services, relays and an embedded broker as
separate processes on PostgreSQL (one database per service, created and
dropped by the run), places orders at a steady rate while faults are
injected, lets the system heal, checks L, D, O and T, and prints the table.
Exits 1 on any violation, 0 otherwise. Run it from the repository root::

    python -m tests.faults.run --orders 1000 --faults 50 --seed 7
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from saga import DurationArgument

from .checks import Report
from .harness import Options, run


def _rate(text: str) -> float:
    """Orders per second: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of orders per second above 0")
    return value


def _whole(minimum: int) -> Callable[[str], int]:
    """The argparse ``type`` of a whole number from ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from {minimum}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tests.faults.run",
        description="Fault-injection run of the reference saga; prints a table, "
        "exits 1 on any violation of L (lost), D (duplicate effect), O (order), T (ended).",
    )
    p.add_argument("--seed", type=int, default=1, help="seed of the fault schedule")
    p.add_argument("--orders", type=_whole(1), default=200, help="orders to place")
    p.add_argument("--faults", type=_whole(0), default=20, help="faults to inject")
    p.add_argument("--rate", type=_rate, default=10.0, help="orders placed per second")
    p.add_argument(
        "--fault-interval",
        type=DurationArgument(zero=False),
        default=None,
        help="seconds between faults (default: spread over the placing time)",
    )
    p.add_argument(
        "--deadline", type=DurationArgument(zero=False), default=30.0, help="saga deadline, seconds"
    )
    p.add_argument(
        "--authorization-delay",
        type=DurationArgument(),
        default=45.0,
        help="slow cards answer after, seconds",
    )
    p.add_argument(
        "--broker-pause",
        type=DurationArgument(),
        nargs=2,
        default=(3.0, 30.0),
        metavar=("MIN", "MAX"),
        help="broker pauses last between MIN and MAX seconds",
    )
    p.add_argument(
        "--long-transaction",
        type=DurationArgument(),
        default=20.0,
        help="seconds an order's transaction is held open (0: none)",
    )
    p.add_argument(
        "--pg-restart",
        action="store_true",
        help="restart PostgreSQL after the other faults (skipped while other clients "
        "use the server: it would break them)",
    )
    p.add_argument(
        "--heal-bound",
        type=DurationArgument(zero=False),
        default=120.0,
        help="seconds to heal after the last fault",
    )
    p.add_argument("--workdir", type=Path, default=None, help="logs go here (default: temp dir)")
    p.add_argument("-v", "--verbose", action="store_true", help="log the faults as they happen")
    return p


async def _interruptible(options: Options) -> Report:
    """The run, cancelled (and cleaned up: processes, databases) on SIGTERM or SIGINT.

    Set here, not left to ``asyncio.run``: a run started in the background
    by a shell ignores SIGINT.
    """
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    return await run(options)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options of a run; exits 2 with the reason for options that make no sense."""
    parser = build_parser()
    args = parser.parse_args(argv)
    shortest, longest = args.broker_pause
    if shortest > longest:
        parser.error(f"argument --broker-pause: MIN ({shortest:g}) is above MAX ({longest:g})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    options = Options(
        seed=args.seed,
        orders=args.orders,
        faults=args.faults,
        rate=args.rate,
        fault_interval=args.fault_interval,
        deadline=args.deadline,
        authorization_delay=args.authorization_delay,
        broker_pause=tuple(args.broker_pause),
        long_transaction=args.long_transaction,
        pg_restart=args.pg_restart,
        heal_bound=args.heal_bound,
        workdir=args.workdir,
    )
    report = asyncio.run(_interruptible(options))
    print(report.table(), flush=True)
    print(f"logs: {report.workdir}")
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
