"""Retry policy and its one adapter to tenacity."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_never,
    wait_exponential,
    wait_random,
)

from outbox.errors import ConfigurationError

__all__ = ["RetryPolicy", "is_retriable"]


def is_retriable(exc: BaseException) -> bool:
    """Return the ``retriable`` flag an error carries (``False`` when it has none)."""
    return bool(getattr(exc, "retriable", False))


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How often and how fast to try again after a retriable error."""

    initial_interval: timedelta = timedelta(milliseconds=200)
    """Wait before the first retry."""

    backoff_coefficient: float = 2.0
    """Factor by which the wait grows after each attempt."""

    maximum_interval: timedelta = timedelta(seconds=10)
    """Longest wait between two attempts."""

    maximum_attempts: int = 5
    """Attempts in all, the first included; ``0`` means no limit."""

    jitter: timedelta = timedelta(milliseconds=100)
    """Largest random amount added to each wait, so that clients spread out."""

    def __post_init__(self) -> None:
        if self.initial_interval <= timedelta(0):
            raise ConfigurationError("initial_interval must be positive")
        if self.maximum_interval < self.initial_interval:
            raise ConfigurationError("maximum_interval must be at least initial_interval")
        if self.backoff_coefficient < 1.0:
            raise ConfigurationError("backoff_coefficient must be at least 1.0")
        if not isinstance(self.maximum_attempts, int) or self.maximum_attempts < 0:
            raise ConfigurationError("maximum_attempts must be 0 (no limit) or positive")
        if self.jitter < timedelta(0):
            raise ConfigurationError("jitter must not be negative")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based), without jitter."""
        seconds = self.initial_interval.total_seconds() * self.backoff_coefficient ** (attempt - 1)
        return min(seconds, self.maximum_interval.total_seconds())

    def retrying(
        self,
        *,
        retry_on: Callable[[BaseException], bool] = is_retriable,
        before_sleep: Callable[[RetryCallState], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> AsyncRetrying:
        """Build the tenacity controller for this policy.

        Errors for which ``retry_on`` is false are raised at once; when the
        attempts run out the last error is raised as it was (``reraise``).
        ``sleep`` replaces ``asyncio.sleep`` between attempts (to make the
        waits interruptible).
        """
        extra: dict[str, Any] = {} if sleep is None else {"sleep": sleep}
        return AsyncRetrying(
            retry=retry_if_exception(retry_on),
            stop=(
                stop_never
                if self.maximum_attempts == 0
                else stop_after_attempt(self.maximum_attempts)
            ),
            # Composed rather than wait_exponential_jitter, whose arguments
            # changed between tenacity releases.
            wait=wait_exponential(
                multiplier=self.initial_interval.total_seconds(),
                exp_base=self.backoff_coefficient,
                max=self.maximum_interval.total_seconds(),
            )
            + wait_random(0, self.jitter.total_seconds()),
            before_sleep=before_sleep,
            reraise=True,
            **extra,
        )
