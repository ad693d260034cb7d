"""Decoding and committing a run's chunks in order, in the worker thread, and the tally.

Parts of the coming commit's chunk are decoded while the pull goes on; a sink whose commit is a
transaction that takes rows bit by bit (PostgreSQL) also writes them ahead into it, so at the
commit only the last part is left to decode and write.
"""

import logging
import random
import time

import pyarrow as pa

from nilus_dagster.engine.settings import RuntimeSettings
from nilus_dagster.errors import SinkError
from nilus_dagster.messages import MessageBatch
from nilus_dagster.sink import STREAM_CREATED_KEY, Decoded, PositionConflict, SinkWriter

logger = logging.getLogger("nilus_dagster.engine")

COMMIT_ATTEMPTS = 20
"""Commits of one chunk that may conflict with other writers before the run fails."""


class Committer:
    """Decodes and commits chunks, in order, in a worker thread; tracks what was committed."""

    def __init__(self, sink: SinkWriter, settings: RuntimeSettings, created: str):
        self.sink = sink
        self.settings = settings
        self.pipeline = settings.pipeline
        self.replace_first = self.pipeline.manifest.sink.options.incremental_strategy == "replace"
        self.metadata = {STREAM_CREATED_KEY: created, "nilus.pipeline": self.pipeline.name}
        self.first_seq: int | None = None
        self.last_seq: int | None = None
        self.newest_ns: int | None = None
        self.rows = 0
        self.dead = 0
        self.messages = 0
        self.bytes = 0
        self.commits = 0
        self.total_commits = 0  # never reset: ``replace`` overwrites on the first only
        self._parts: list[tuple[int, int, Decoded]] = []
        self._failed: BaseException | None = None
        # Parts written ahead into the sink's open transaction keep only their (empty) tables'
        # schemas here; ``_whole`` says the chunk must be decoded whole at its commit.
        self._ahead = True
        self._whole = False

    def reset_tally(self) -> None:
        """Start counting afresh (a service reports what it committed since its last report).

        The newest message time stays: it is the table's, not the interval's.
        """
        self.first_seq = self.last_seq = None
        self.rows = self.dead = self.messages = self.bytes = self.commits = 0

    def prepare_part(self, part: MessageBatch) -> None:
        """Decode the next part of the coming commit's chunk ahead of that commit.

        Runs in the commit thread, in order with the commits, so it sees the table schema the
        commit will write against. A failure is raised by that commit.
        """
        if self._parts and part.first_seq <= self._parts[-1][1]:
            self.drop_parts()  # left by a drain that failed: this is the chunk's first part
        if self._failed is not None or self._whole:
            return
        try:
            decoded = self.sink.prepare(part, format=self.settings.address.format)
        except BaseException as exc:  # raised by the next commit, which owns the error
            self._failed = exc
            return
        self._parts.append((part.first_seq, part.last_seq, self._write_ahead(decoded, part)))

    def _write_ahead(self, decoded: Decoded, part: MessageBatch) -> Decoded:
        """``decoded``, or when the sink wrote it into the commit's transaction, its schema.

        Only parts with the first part's columns and types are written ahead, the same rule
        as for using them at all: a chunk whose fields change is decoded whole at its commit.
        """
        if not self._ahead:
            return decoded
        if self._parts and not decoded.rows.schema.equals(self._parts[0][2].rows.schema):
            self._decode_whole()
            return decoded
        try:
            written = self.sink.write_ahead(decoded, last_seq=part.last_seq)
        except Exception as exc:  # the commit meets the same cause, and owns the error
            logger.debug("%s: not written ahead: %s", self.pipeline.name, exc)
            self._decode_whole()
            return decoded
        if not written:
            self._ahead = False  # this sink writes at the commit only
            return decoded
        return Decoded(decoded.rows.slice(0, 0), decoded.dead_letters.slice(0, 0))

    def _decode_whole(self) -> None:
        """Drop what was written ahead: the chunk's commit decodes and writes all of it."""
        self.sink.discard_ahead()
        self._ahead = False
        self._whole = True
        self._parts = []

    def drop_parts(self) -> None:
        """Forget the parts decoded or written ahead (after a failure, or when done)."""
        self.sink.discard_ahead()
        self._parts, self._ahead, self._whole = [], True, False

    def _assemble(self, chunk: MessageBatch, parts: list[tuple[int, int, Decoded]]) -> Decoded:
        """``chunk`` decoded: its parts decoded ahead, plus the rest decoded now.

        The parts are used only when they hold the chunk's prefix and all came out with the
        same columns and types; otherwise (a field appears, disappears or changes type within
        the chunk) the chunk is decoded whole, exactly as if no part had been decoded ahead.
        """
        fmt = self.settings.address.format
        if not parts or parts[0][0] != chunk.first_seq or parts[-1][1] > chunk.last_seq:
            return self._whole_chunk(chunk)
        pieces = [decoded for _, _, decoded in parts]
        rest = chunk.after(parts[-1][1])
        if len(rest):
            pieces.append(self.sink.prepare(rest, format=fmt))
        if len(pieces) == 1:
            return pieces[0]
        schema = pieces[0].rows.schema
        if any(not p.rows.schema.equals(schema) for p in pieces[1:]):
            return self._whole_chunk(chunk)
        try:
            return Decoded(
                pa.concat_tables([p.rows for p in pieces]),
                pa.concat_tables([p.dead_letters for p in pieces]),
            )
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return self._whole_chunk(chunk)

    def _whole_chunk(self, chunk: MessageBatch) -> Decoded:
        self.sink.discard_ahead()  # the whole chunk goes to the commit, parts written or not
        return self.sink.prepare(chunk, format=self.settings.address.format)

    def commit(self, chunk: MessageBatch) -> int:
        """Decode (what was not decoded ahead) and commit ``chunk``; returns the position."""
        parts, self._parts = self._parts, []
        failed, self._failed = self._failed, None
        whole, self._whole, self._ahead = self._whole, False, True
        if failed is not None:
            self.sink.discard_ahead()
            raise failed
        if whole:
            parts = []
        stalled = 0  # conflicts in a row that did not move the position
        while True:
            chunk = chunk.after(self.sink.position)
            if not len(chunk):
                self.sink.discard_ahead()  # nothing is left to commit: no lock stays held
                return self.sink.position
            decoded = self._assemble(chunk, parts)
            parts = []  # after a conflict the chunk is decoded again, against the new schema
            try:
                result = self.sink.commit(
                    decoded.rows,
                    decoded.dead_letters,
                    last_seq=chunk.last_seq,
                    overwrite=self.replace_first and self.total_commits == 0,
                    commit_metadata=self.metadata,
                )
                break
            except PositionConflict as conflict:
                # Another writer committed first: re-read its position and keep only what is
                # still ours to write. Nothing is written twice.
                before = self.sink.position
                self.sink.open()
                if self.sink.position != before:
                    stalled = 0  # progress: what is left of the chunk shrank
                    logger.warning(
                        "%s: a concurrent commit moved the position to %s; continuing after it",
                        self.pipeline.name,
                        self.sink.position,
                    )
                    continue
                # The table changed but not the position: another pipeline writing the same
                # table, a new column or index, a compaction. The same rows again, on a fresh
                # read of the table taken after a pause, so a busy writer does not win each time.
                stalled += 1
                if stalled == COMMIT_ATTEMPTS:
                    raise SinkError(
                        f"{self.pipeline.path}: {stalled} commits of the same rows in a row "
                        "conflicted with other writers of the table, which never moved this "
                        "pipeline's position: look for another writer changing the table "
                        f"without pause (another pipeline, maintenance jobs); the last: {conflict}"
                    ) from None
                logger.warning("%s: committing again after %s", self.pipeline.name, conflict)
                time.sleep(random.uniform(0.05, 0.25) * min(stalled, 4))
                self.sink.open()
        self.commits += 1
        self.total_commits += 1
        self.first_seq = chunk.first_seq if self.first_seq is None else self.first_seq
        self.last_seq = chunk.last_seq
        self.newest_ns = max(self.newest_ns or 0, max(chunk.timestamps_ns))
        self.rows += result.rows_written
        self.dead += result.dead_letters
        self.messages += len(chunk)
        self.bytes += chunk.nbytes
        return self.sink.position
