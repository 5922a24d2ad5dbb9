"""What every ``saga`` command shares: exit statuses, one-line errors, help, plug-ins.

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
import logging
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, entry_points, version
from typing import TypeAlias

from outbox import OutboxError
from outbox.errors import ConfigurationError as OutboxConfigurationError
from saga.errors import ConfigurationError, SagaError

__all__ = [
    "ENTRY_POINT_GROUP",
    "EXIT_INTERRUPTED",
    "EXIT_RUNTIME",
    "EXIT_USAGE",
    "DefaultsHelpFormatter",
    "describe",
    "exit_status",
    "load_plugins",
    "package_version",
]

ENTRY_POINT_GROUP = "choreosaga.commands"
"""Entry point group of the commands that packages add to ``saga``."""

EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

log = logging.getLogger(__name__)


def exit_status(exc: BaseException) -> int | None:
    """The exit status for an error, or None when it is a bug (keep its traceback)."""
    if isinstance(exc, ConfigurationError | OutboxConfigurationError):
        return EXIT_USAGE
    if isinstance(exc, SagaError | OutboxError | OSError):
        return EXIT_RUNTIME
    return None


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
