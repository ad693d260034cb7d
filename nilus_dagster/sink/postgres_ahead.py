"""Rows loaded ahead of a PostgreSQL commit, into the transaction the commit will end.

The engine hands the PostgreSQL sink each part of a chunk as soon as it is decoded
(:meth:`~nilus_dagster.sink.writer.SinkWriter.write_ahead`). The sink locks the position row
right away, in the caller's thread, then loads the part in a thread of its own: the
``COPY`` (mostly the server's work, the driver holding no GIL meanwhile) runs while the engine
decodes the next part and the pull goes on. One load at a time, in order: the next part, the
commit and a rollback each wait for the load before them, and fail with its error.
"""

import contextlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass
class Ahead:
    """What was loaded ahead in the open transaction (nothing of it is committed yet)."""

    columns: dict[str, str] | None  # the table's columns, with the ones added in it
    dead_columns: dict[str, str] | None
    newest: datetime | None  # the newest _nats_timestamp, committed or loaded ahead
    locked: bool = False  # the transaction holds the position row's lock
    rows: int = 0
    dead_letters: int = 0
    last_seq: int = 0  # the last sequence handed over (its load may still be running)


class Loads:
    """The sink's load thread: one load running at a time, its failure kept for the next wait."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None

    def submit(self, load: Callable[..., None], *args: Any) -> None:
        """Start ``load(*args)`` once the load before it is done.

        Raises:
            Exception: The load before it failed (that error).
        """
        self.wait()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nilus-pg-load")
        self._pending = self._executor.submit(load, *args)

    def wait(self) -> None:
        """Wait for the running load.

        Raises:
            Exception: It failed (that error).
        """
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the running load, whatever its outcome, and end the thread."""
        # Its transaction is rolled back whatever happened to it.
        with contextlib.suppress(Exception):
            self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
