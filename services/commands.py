"""The shop's ``saga demo`` command, plugged into ``saga`` through an entry point.

``pyproject.toml`` declares it in the ``choreosaga.commands`` group; the
``saga`` command finds it there, so that the library never imports the shop.
This module stays light: the demo itself is imported when the command runs.
"""

from __future__ import annotations

import argparse

from saga import ConfigurationError, DurationArgument

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``saga demo`` to the ``saga`` command's sub-commands."""
    p = commands.add_parser(
        "demo",
        help="place orders through the reference services and check the outcome",
        description="Start a local Kafka-protocol broker (unless --bootstrap-servers), "
        "one database per service (SQLite unless --database-url), the order, inventory, "
        "payment and shipping services with their relays; place orders with a mix of "
        "outcomes, wait until every saga ended, print a summary and check the services "
        "against each other. Exits 1 if a check fails.",
    )
    p.add_argument("--orders", type=int, default=100, help="orders to place")
    p.add_argument(
        "--database-url",
        default=None,
        help="PostgreSQL URL naming a database, say 'demo': each service gets the "
        "database demo_<service>, which the demo creates, marks, and drops on its next run; "
        "it never drops a database it did not create. "
        "Default: SQLite files in a temporary directory",
    )
    p.add_argument(
        "--bootstrap-servers", default=None, help="use this Kafka instead of an embedded broker"
    )
    p.add_argument(
        "--directory",
        default=None,
        help="keep the SQLite files in this directory (else a temporary one, removed at the end)",
    )
    p.add_argument(
        "--deadline",
        type=DurationArgument(zero=False),
        default=10.0,
        help="saga deadline in seconds",
    )
    p.add_argument(
        "--timeout", type=DurationArgument(), default=120.0, help="give up waiting after seconds"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    """Run ``saga demo`` with the parsed arguments; return the exit status."""
    if args.orders < 1:
        raise ConfigurationError("--orders must be at least 1")
    from .demo import DemoOptions
    from .demo import main as demo_main

    return demo_main(
        DemoOptions(
            orders=args.orders,
            database_url=args.database_url,
            bootstrap_servers=args.bootstrap_servers,
            directory=args.directory,
            deadline=args.deadline,
            timeout=args.timeout,
            json=args.json,
        )
    )
