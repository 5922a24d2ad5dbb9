"""What every ``saga`` command shares: exit statuses, one-line errors, help, durations, plug-ins.

Exit statuses, the same for every command:

====  =========================================================================
0     done
1     a runtime failure: a server unreachable or refusing, a file that cannot
      be written, a check that failed
2     a usage error: a bad option, a URL that cannot be used
130   interrupted (Ctrl-C), after cleaning up
====  =========================================================================

A failure prints one line on stderr, ``saga COMMAND: what went wrong``; with
``--verbose`` the traceback comes first. Errors are mapped in one place,
:func:`exit_status`, so that every command gets the same treatment: commands
raise :class:`~saga.errors.ConfigurationError` (or outbox's) for usage
errors, any other ``SagaError``/``OutboxError`` or an ``OSError`` for runtime
failures. Anything else is a bug and keeps its traceback.

A ``--database-url`` goes through :func:`database_url` before anything
connects: none given, a value that is not a URL (a file path without
``sqlite:///``), a SQLite file that is not there are usage errors, the same in
every command.

A duration option takes ``type=DurationArgument(...)``: a finite number of
seconds (or days), at most ten years, else a usage error naming the option,
before anything is opened. ``float`` would take ``nan``, ``inf`` and negative
numbers, which fail far from the option (a traceback converting NaN days to a
``timedelta``) or quietly mean something else. Likewise a count takes
``type=CountArgument(...)`` and a broker list ``type=broker_list``: a value
that a settings object would refuse later is refused here, under the name the
user typed (``--lease-ttl``), not the setting's (``lease_ttl``).

Commands that do not belong to the library (the reference shop's ``demo``)
plug in through the entry point group :data:`ENTRY_POINT_GROUP`: each entry
point names a callable that takes the ``add_subparsers()`` object, adds its
sub-command, and sets the ``run`` default to a function of the parsed
arguments that returns the exit status::

    [project.entry-points."choreosaga.commands"]
    demo = "myshop.cli:register"

    def register(commands):
        parser = commands.add_parser("demo", help="...")
        parser.set_defaults(run=lambda args: ...)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import signal
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from importlib.metadata import PackageNotFoundError, entry_points, version
from pathlib import Path
from typing import Literal, TypeAlias

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from outbox import OutboxError
from outbox.errors import ConfigurationError as OutboxConfigurationError
from saga.errors import ConfigurationError, SagaError

__all__ = [
    "ENTRY_POINT_GROUP",
    "EXIT_BROKEN_PIPE",
    "EXIT_INTERRUPTED",
    "EXIT_RUNTIME",
    "EXIT_USAGE",
    "CountArgument",
    "DefaultsHelpFormatter",
    "DurationArgument",
    "broker_list",
    "database_url",
    "describe",
    "exit_status",
    "load_plugins",
    "package_version",
    "stop_event",
]

ENTRY_POINT_GROUP = "choreosaga.commands"
"""Entry point group of the commands that packages add to ``saga``."""

EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141
"""The reader of the output went away (``saga trace ... | head``): 128 + SIGPIPE, as a shell
reports a tool that the signal ended."""

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

log = logging.getLogger(__name__)


def exit_status(exc: BaseException) -> int | None:
    """The exit status for an error, or None when it is a bug (keep its traceback)."""
    if isinstance(exc, ConfigurationError | OutboxConfigurationError):
        return EXIT_USAGE
    if isinstance(exc, SagaError | OutboxError | OSError):
        return EXIT_RUNTIME
    return None


def database_url(
    given: str | None, *, variables: str = "DATABASE_URL", must_exist: bool = True
) -> str:
    """Check a command's ``--database-url`` before anything connects; return it.

    Raises:
        ConfigurationError: (exit status 2) None was given (nor set in the
            environment ``variables`` the message names), the value is not a
            database URL (a file path without ``sqlite:///``), or, with
            ``must_exist``, it names a SQLite file that does not exist
            (connecting would create an empty one).
    """
    if not given:
        raise ConfigurationError(f"give --database-url or set {variables}")
    try:
        url = make_url(given)
    except ArgumentError as exc:
        raise ConfigurationError(f"not a database URL: {given!r}") from exc
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        raise ConfigurationError(
            f"{given!r} is a SQLite database in memory, which no other process sees: "
            "give a file, sqlite:///path/to/file.db"
        )
    if must_exist and url.get_backend_name() == "sqlite" and not Path(url.database or "").is_file():
        raise ConfigurationError(f"no SQLite database at {url.database}")
    return given


def describe(exc: BaseException) -> str:
    """The error as one line: what went wrong, without the exception's class."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}"
    else:
        text = str(exc) or type(exc).__name__
    # One line: drivers (psycopg, aiokafka) add hints on further lines.
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Show an option's default after its help, unless the help already says it.

    Unlike ``argparse.ArgumentDefaultsHelpFormatter``, defaults that say
    nothing (None, False) are left out, and a help that mentions its default
    itself (``default: $DATABASE_URL``) is kept as written, so that a value
    read from the environment, perhaps a password, is never printed.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text.lower()
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or (not action.option_strings and action.nargs not in ("?", "*"))
        ):
            return action.help
        return f"{text} (default: %(default)s)"


MAX_DURATION = timedelta(days=10 * 365)
"""Ten years: a longer lease, poll, pause or retention is a typing error."""


@dataclass(frozen=True, kw_only=True)
class DurationArgument:
    """The argparse ``type`` of a duration option: a finite number of ``unit``.

    ``p.add_argument("--retention-days", type=DurationArgument(unit="days", zero=False))``
    refuses ``nan``, ``inf``, negative numbers, 0 and more than ten years
    (3650 days) with ``argument --retention-days: '0' is not a number of days
    above 0, up to 3650 (ten years)``, exit status 2. A number above 0 that
    comes to less than a microsecond (a ``timedelta`` of 0) is refused too.
    """

    unit: Literal["seconds", "days"] = "seconds"
    """What the number counts; the option's name or help says which."""

    zero: bool = True
    """Whether 0 is a duration here (a relay's retention of 0 deletes each row as
    it is published); if not, the number must be above 0."""

    least: float = 0.0
    """The smallest number taken, where that is more than just above 0 (a relay's
    shard lease lasts at least 1 second)."""

    @property
    def limit(self) -> float:
        """The largest number taken: ten years, in :attr:`unit`."""
        return MAX_DURATION / timedelta(**{self.unit: 1})

    def __call__(self, text: str) -> float:
        """Return the number ``text`` gives, or raise the usage error."""
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if self.least:
            lowest, bounds = value >= self.least, f"from {self.least:g} to"
        elif self.zero:
            lowest, bounds = value >= 0, "from 0 to"
        else:
            lowest, bounds = value > 0, "above 0, up to"
        if not (math.isfinite(value) and lowest and value <= self.limit):
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a number of {self.unit} {bounds} {self.limit:.0f} (ten years)"
            )
        if value and not timedelta(**{self.unit: value}):
            # timedelta's resolution: 1e-7 seconds would be 0, which is no duration here.
            raise argparse.ArgumentTypeError(
                f"{text!r} {self.unit} is shorter than a microsecond, the shortest duration taken"
            )
        return value


@dataclass(frozen=True, kw_only=True)
class CountArgument:
    """The argparse ``type`` of a count option: a whole number from ``least`` to ``most``.

    ``p.add_argument("--shards", type=CountArgument(most=4096))`` refuses
    ``0``, ``4097``, ``2.5`` and ``many`` with ``argument --shards: '0' is not a
    whole number from 1 to 4096``, exit status 2.
    """

    least: int = 1
    """The smallest number taken."""

    most: int | None = None
    """The largest number taken, if there is one."""

    def __call__(self, text: str) -> int:
        """Return the number ``text`` gives, or raise the usage error."""
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < self.least or (self.most is not None and value > self.most):
            bounds = (
                f"of at least {self.least}"
                if self.most is None
                else f"from {self.least} to {self.most}"
            )
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number {bounds}")
        return value


def broker_list(text: str) -> str:
    """The argparse ``type`` of ``--bootstrap-servers``: refuse a value naming no broker.

    An empty value stays what it was: the option not given (the default applies).
    """
    if text and not any(part.strip() for part in text.split(",")):
        raise argparse.ArgumentTypeError(f"{text!r} names no broker: give host:port[,host:port]")
    return text


def stop_event(*, hangup: bool = False) -> asyncio.Event:
    """An event that SIGTERM and SIGINT set (and SIGHUP, with ``hangup``): how a
    command that runs until stopped learns it should stop. Call it in the running loop.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signums = (signal.SIGTERM, signal.SIGINT, *((signal.SIGHUP,) if hangup else ()))
    for signum in signums:
        loop.add_signal_handler(signum, stop.set)
    return stop


def package_version() -> str:
    """The installed version of choreosaga."""
    try:
        return version("choreosaga")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def load_plugins(commands: Subparsers) -> None:
    """Add the commands that installed packages declare in :data:`ENTRY_POINT_GROUP`.

    A plug-in that fails to load is logged and left out: the other commands
    still work.
    """
    for entry in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if entry.name in commands.choices:
            continue
        try:
            register: Callable[[Subparsers], None] = entry.load()
            register(commands)
        except Exception:
            log.warning(
                "cannot load the %r command from %s", entry.name, entry.value, exc_info=True
            )
