"""Waiting out a NATS failover within ``failover_timeout``: one call, or a pull's recovery.

In a cluster, a stream whose leader died answers nothing until the other nodes elected a new
one (4-9 s measured on loopback), and the node a connection went to may be killed, paused or
restarting. :class:`Failover` runs one step of the source (an API call, a check) again while it
fails in a way that passes, reconnecting (to another server first) as needed;
:class:`PullRecovery` is the same budget for a pull that has to recreate its reader.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nilus_dagster.errors import SourceError
from nilus_dagster.jetstream.connection import Link
from nilus_dagster.jetstream.diagnostics import Diagnostics
from nilus_dagster.jetstream.errors import TransportError
from nilus_dagster.jetstream.session import Session
from nilus_dagster.redaction import redact

logger = logging.getLogger("nilus_dagster.jetstream.source")

T = TypeVar("T")


class Failover:
    """Runs steps of a source, retrying the failures that pass for ``timeout`` seconds.

    Args:
        session: The source's connection, reconnected between attempts when it is lost.
        diagnostics: Explains failures.
        timeout: Seconds from the first failure after which the last one is raised.
        pause: Seconds between attempts.
    """

    def __init__(self, session: Session, diagnostics: Diagnostics, *, timeout: float, pause: float):
        self.session = session
        self.diagnostics = diagnostics
        self.timeout = timeout
        self.pause = pause

    async def run(self, doing: str, step: Callable[[Link], Awaitable[T]]) -> T:
        """``step(link)`` on the current connection, retried for at most ``timeout`` seconds.

        It is tried again while it fails in a way that passes (no answer, no leader yet, a
        connection lost). A refusal (permissions, a missing stream, credentials) is raised at once.

        Raises:
            SourceError: A failure that does not pass, or the last failure once the time is
                up (its text, plus where and how long it was tried).
        """
        since: float | None = None
        while True:
            link: Link | None = None
            try:
                link = await self.session.ensure_or_fail(doing)
                result = await step(link)
            except (SourceError, TransportError) as exc:
                if not exc.retryable:
                    raise
                error = exc if isinstance(exc, SourceError) else self.diagnostics.error(exc, doing)
                now = time.monotonic()
                if since is None:
                    since = now
                    logger.warning(
                        "%s; trying again for up to %gs (failover_timeout)",
                        redact(str(error)),
                        self.timeout,
                    )
                elif now - since > self.timeout:
                    raise self.gave_up(str(error), since) from None
                if link is not None:
                    # A paused node keeps the connection open: drop it so the next attempt
                    # reconnects, to another server first.
                    await self.session.drop_if_dead(link)
                await asyncio.sleep(self.pause)
                continue
            if since is not None:
                logger.info("could %s again after %.1fs", doing, time.monotonic() - since)
            return result

    def gave_up(self, problem: str, since: float) -> SourceError:
        """The error once the time is up: the last problem, where, and for how long."""
        return SourceError(
            redact(
                f"{problem} (still failing at {self.diagnostics.hosts} after "
                f"{time.monotonic() - since:.0f}s of retries; failover_timeout is "
                f"{self.timeout:g}s: are most of the cluster's nodes up?)"
            )
        )


class PullRecovery:
    """A time budget for getting a pull going again after a failure."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.since: float | None = None
        self.problem = ""

    def failed(self, problem: str, after_seq: int) -> None:
        """Note a failure (the first one is logged as a warning)."""
        if self.since is None:
            self.since = time.monotonic()
            logger.warning("%s; resuming after sequence %d", redact(problem), after_seq)
        else:
            logger.debug("still failing: %s", redact(problem))
        self.problem = problem

    def ok(self) -> None:
        """The pull delivers again."""
        if self.since is not None:
            logger.info("pull resumed after %.1fs", time.monotonic() - self.since)
        self.since = None

    @property
    def exhausted(self) -> bool:
        """Whether the failures have lasted longer than the budget."""
        return self.since is not None and time.monotonic() - self.since > self.seconds

    def gave_up(self, stream: str, hosts: str) -> SourceError:
        """The error once the budget is spent: the stream, where, the budget and last problem."""
        return SourceError(
            redact(
                f"could not resume pulling from stream {stream} at {hosts} within "
                f"{self.seconds:g}s (failover_timeout): {self.problem}"
            )
        )
