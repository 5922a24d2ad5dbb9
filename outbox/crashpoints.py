"""Named crash points for fault-injection tests; inert unless a test enables them.

A crash point marks a place where a process dying is interesting, such as a
relay between publishing a batch and marking it, or a consumer between its
database commit and its offset commit. :func:`crash_point` does nothing unless
the environment variable ``CHOREOSAGA_CRASH_POINTS`` names a directory (no
production deployment sets it). A test then arms one process at one point by
creating the file ``<directory>/<name>.<pid>``: the next time that process
passes the point, it removes the file and kills itself with SIGKILL, exactly
as an abrupt crash would (no cleanup, no ``finally`` blocks, no flush).

The check costs one ``stat`` call when enabled and one dictionary lookup (read
once, at import) when not.
"""

from __future__ import annotations

import os
import signal

__all__ = ["CRASH_POINTS_VARIABLE", "arm", "crash_point"]

CRASH_POINTS_VARIABLE = "CHOREOSAGA_CRASH_POINTS"
"""Names the directory of armed crash points; unset in production."""

_DIRECTORY = os.environ.get(CRASH_POINTS_VARIABLE) or None


def crash_point(name: str) -> None:
    """Die here with SIGKILL if this process was armed at ``name``; else return."""
    if _DIRECTORY is None:
        return
    path = os.path.join(_DIRECTORY, f"{name}.{os.getpid()}")
    try:
        os.remove(path)
    except FileNotFoundError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def arm(directory: str, name: str, pid: int) -> str:
    """Arm process ``pid`` to crash at ``name``; return the file that arms it.

    Removing the file before the process reaches the point disarms it.
    """
    path = os.path.join(directory, f"{name}.{pid}")
    with open(path, "w"):
        pass
    return path
