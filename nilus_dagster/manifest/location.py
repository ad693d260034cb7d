"""Where a sink's table is, as every writer and reader of it sees it."""

from collections.abc import Mapping
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class TableLocation:
    """Where a sink's table is, and what its writer needs to reach it.

    Attributes:
        uri: The table's location as people and downstream loaders see it: the Delta table's
            URI, or for a database the server, database and table (never a secret).
        storage_options: What the writer connects with, secrets filled at run time:
            ``deltalake`` storage options for Delta, connection parameters for a database.
        kind: The writer that serves it: the depot ``type`` (``delta`` by default).
        table: ``schema.table`` inside the store, for stores that name tables (databases,
            an Iceberg catalog).
        options_source: Where the storage options are written and the variables that fill
            them (``depots.yaml: depots.lake.storage_options (AWS_SECRET_ACCESS_KEY from
            {S3_SECRET})``), for errors that must say what to fix; empty when there are none.
        catalog: An Iceberg depot's pyiceberg catalog properties (``uri``...), filled at
            run time.
    """

    uri: str
    # Filled secrets: never in a repr (a log line or a traceback's locals).
    storage_options: Mapping[str, str] = field(default_factory=dict, repr=False)
    kind: str = "delta"
    table: str = ""
    options_source: str = field(default="", compare=False)
    catalog: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def is_local(self) -> bool:
        """Whether the table is on the local file system."""
        scheme = self.uri.partition("://")[0].lower() if "://" in self.uri else "file"
        return scheme == "file"

    def sibling(self, suffix: str) -> "TableLocation":
        """The location of a table next to this one (the dead-letter table)."""
        return replace(
            self,
            uri=self.uri.rstrip("/") + suffix,
            table=self.table + suffix if self.table else "",
        )
