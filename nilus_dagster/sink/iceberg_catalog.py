"""Reaching an Iceberg table: its catalog, FileIO properties, partition spec and Arrow schema.

The catalog is any pyiceberg catalog, a SQL catalog by default (SQLite embedded in a local root,
PostgreSQL in production). Its properties come from the depot with their placeholders filled;
the depot's ``storage_options`` (the ``deltalake`` spellings people already use, such as
``AWS_ACCESS_KEY_ID``) are translated to pyiceberg's FileIO properties.
"""

import re
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.exceptions import NoSuchTableError
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.transforms import (
    DayTransform,
    HourTransform,
    IdentityTransform,
    MonthTransform,
    Transform,
    YearTransform,
)
from sqlalchemy.exc import DBAPIError, IntegrityError

from nilus_dagster.errors import SinkError
from nilus_dagster.manifest.depots import TableLocation
from nilus_dagster.redaction import redact

DEFAULT_CATALOG_NAME = "nilus"

REQUIRED_PROPERTIES = {
    # pyiceberg retries a commit that lost the compare-and-swap by re-applying it on top of
    # the winner (measured on 0.12: the second of two writers at one position appended its
    # rows again). The position must be re-read instead, so a lost race has to fail.
    "commit.retry.num-retries": "0",
    # Old metadata files are deleted as new ones are written, so a long-running pipeline's
    # metadata folder stays bounded.
    "write.metadata.delete-after-commit.enabled": "true",
}
"""Properties every table written by the sink carries (set on existing tables when opened)."""

CREATE_PROPERTIES = {
    **REQUIRED_PROPERTIES,
    "write.metadata.previous-versions-max": "10",
    # Manifests are merged on append, so the manifest list does not grow by one per commit.
    "commit.manifest-merge.enabled": "true",
    # As Delta writes (zstd, pyiceberg's default, cost a quarter more time per commit).
    "write.parquet.compression-codec": "snappy",
}
"""Properties of a table the sink creates (a user may change these later)."""

# deltalake / object_store spellings -> pyiceberg FileIO properties.
_STORAGE_KEYS = {
    "aws_access_key_id": "s3.access-key-id",
    "aws_secret_access_key": "s3.secret-access-key",
    "aws_session_token": "s3.session-token",
    "aws_region": "s3.region",
    "aws_default_region": "s3.region",
    "aws_endpoint_url": "s3.endpoint",
    "aws_endpoint": "s3.endpoint",
    "endpoint_url": "s3.endpoint",
    "region": "s3.region",
    "azure_storage_account_name": "adls.account-name",
    "azure_storage_account_key": "adls.account-key",
    "azure_storage_sas_token": "adls.sas-token",
    "google_service_account": "gcs.service-account-path",
}
_TRANSFORMS: dict[str, type[Transform[Any, Any]]] = {
    "identity": IdentityTransform,
    "year": YearTransform,
    "month": MonthTransform,
    "day": DayTransform,
    "hour": HourTransform,
}
_PARTITION = re.compile(r"^\s*(?:(\w+)\s*\(\s*([^()\s]+)\s*\)|([^()\s]+))\s*$")


def catalog_properties(location: TableLocation) -> dict[str, str]:
    """Pyiceberg properties for ``location``'s catalog: the depot's, plus its FileIO settings.

    A SQL catalog is the default type; ``warehouse`` defaults to the folder holding the table's
    schema folder (the depot's root).
    """
    properties: dict[str, str] = {}
    for key, value in location.storage_options.items():
        mapped = _STORAGE_KEYS.get(key.lower())
        if mapped is not None:
            properties[mapped] = value
        elif "." in key:  # already a pyiceberg property
            properties[key] = value
    properties.update(location.catalog)
    properties.pop("name", None)
    properties.setdefault("type", "sql")
    properties.setdefault("warehouse", location.uri.rstrip("/").rsplit("/", 2)[0])
    return properties


def catalog_exists(location: TableLocation) -> bool:
    """Whether the catalog may hold tables already.

    An embedded SQLite file not created yet holds none.
    """
    uri = catalog_properties(location).get("uri", "")
    return not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).exists()


def catalog_name(location: TableLocation) -> str:
    """The catalog's name (``name`` in the depot's catalog, ``nilus`` by default).

    A SQL catalog keeps it with every table, so readers must open the catalog under it.
    """
    return location.catalog.get("name") or DEFAULT_CATALOG_NAME


def connect(location: TableLocation) -> Catalog:
    """Open the catalog of ``location`` (creating an embedded SQLite file's folder).

    Raises:
        SinkError: The catalog cannot be reached or its properties are wrong.
    """
    properties = catalog_properties(location)
    uri = properties.get("uri", "")
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):
        try:
            return load_catalog(catalog_name(location), **properties)
        except Exception as exc:
            # Two processes opening a new catalog database at once both create its tables,
            # and the slower one fails (measured on PostgreSQL: a unique violation); the
            # tables exist by then, so opening again succeeds.
            error = exc
            if not catalog_init_race(exc):
                break
            time.sleep(0.2 * (attempt + 1))
    raise SinkError(
        f"cannot open the Iceberg catalog {redact(uri) or properties['type']}: "
        f"{error_text(error)}. Check the depot's catalog properties (uri, credentials) and "
        "that the catalog's database is reachable"
    ) from None


# SQLSTATEs of two processes creating the catalog's tables at once (measured on PostgreSQL 15,
# by timing: unique_violation on the type catalog, duplicate_table, or duplicate_object for
# the table's row type).
_INIT_RACE_STATES = ("23505", "42P07", "42710")


def catalog_init_race(exc: BaseException) -> bool:
    """Whether ``exc`` is what the slower of two openers of a new catalog gets.

    The faster one created the catalog's tables, so opening again succeeds.
    """
    if isinstance(exc, IntegrityError):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    driver_error = exc.orig
    # psycopg names the SQLSTATE sqlstate, psycopg2 pgcode.
    state = getattr(driver_error, "sqlstate", None) or getattr(driver_error, "pgcode", None)
    if state in _INIT_RACE_STATES:
        return True
    # sqlite3 reports an existing table only as a generic OperationalError (SQLITE_ERROR),
    # so its text is the one signal there (measured: "table iceberg_tables already exists").
    return isinstance(driver_error, sqlite3.OperationalError) and "already exists" in str(
        driver_error
    )


def identifier(location: TableLocation) -> tuple[str, str]:
    """``(namespace, table)`` of ``location``: the schema and table of ``dest_table``."""
    table = location.table or "/".join(location.uri.rstrip("/").rsplit("/", 2)[-2:])
    namespace, _, name = table.replace("/", ".").rpartition(".")
    if not namespace or not name:
        raise SinkError(f"an Iceberg table needs dest_table: <schema>.<table>, got {table!r}")
    return namespace, name


def load_table(catalog: Catalog, ident: tuple[str, str]) -> Table | None:
    """The table, or ``None`` when the catalog does not have it."""
    try:
        return catalog.load_table(ident)
    except NoSuchTableError:
        return None


def ensure_namespace(catalog: Catalog, namespace: str) -> None:
    """Create ``namespace`` when missing (two writers creating it at once is fine)."""
    try:
        catalog.create_namespace_if_not_exists(namespace)
    except Exception:
        # The SQL catalog checks, then inserts: a writer creating it in between makes the
        # insert fail, and the namespace is there.
        if not catalog.namespace_exists(namespace):
            raise


def create_table(
    catalog: Catalog,
    ident: tuple[str, str],
    location: str,
    rows: pa.Table,
    partition_fields: Sequence[tuple[str, Transform[Any, Any], str]],
    snapshot_properties: dict[str, str],
) -> None:
    """Create table ``ident`` at ``location`` holding ``rows``, in one catalog commit.

    Its namespace is created when missing; its partition spec is ``partition_fields`` (as
    :func:`partition_fields` returns them) and its first snapshot's summary
    ``snapshot_properties``.

    Raises:
        TableAlreadyExistsError: Another writer created the table first (the catalog inserts
            the table's row only if there is none).
    """
    ensure_namespace(catalog, ident[0])
    with catalog.create_table_transaction(
        ident, schema=rows.schema, location=location, properties=CREATE_PROPERTIES
    ) as txn:
        if partition_fields:
            with txn.update_spec() as spec:
                for column, transform, field_name in partition_fields:
                    spec.add_field(column, transform, field_name)
        txn.append(rows, snapshot_properties=snapshot_properties)


def partition_fields(partition_by: Sequence[str]) -> list[tuple[str, Transform[Any, Any], str]]:
    """``partition_by`` entries as ``(column, transform, partition field name)``.

    An entry is a column (identity) or ``year|month|day|hour(column)``, for example
    ``day(_nats_timestamp)``.

    Raises:
        SinkError: An entry is not of that shape.
    """
    fields = []
    for entry in partition_by:
        match = _PARTITION.match(entry)
        transform_name = (match.group(1) or "identity").lower() if match else ""
        if match is None or transform_name not in _TRANSFORMS:
            raise SinkError(
                f"partition_by entry {entry!r} is not a column or "
                f"{'|'.join(t for t in _TRANSFORMS if t != 'identity')}(column), e.g. "
                "day(_nats_timestamp)"
            )
        column = match.group(2) or match.group(3)
        transform = _TRANSFORMS[transform_name]()
        name = column if transform_name == "identity" else f"{column}_{transform_name}"
        fields.append((column, transform, name))
    return fields


def arrow_schema(schema: Schema) -> pa.Schema:
    """The table's schema as the Arrow types decoding produces.

    ``string``, not ``large_string``, and no field-id metadata, so conforming casts only what
    differs.
    """
    return pa.schema([pa.field(f.name, _plain(f.type)) for f in schema.as_arrow()])


def _plain(dtype: pa.DataType) -> pa.DataType:
    if pa.types.is_large_string(dtype):
        return pa.string()
    if pa.types.is_large_binary(dtype):
        return pa.binary()
    if pa.types.is_large_list(dtype) or pa.types.is_list(dtype):
        return pa.list_(_plain(dtype.value_type))
    if pa.types.is_map(dtype):
        return pa.map_(_plain(dtype.key_type), _plain(dtype.item_type))
    if pa.types.is_struct(dtype):
        return pa.struct([pa.field(f.name, _plain(f.type)) for f in dtype])
    return dtype


def error_text(exc: BaseException) -> str:
    """An error as one redacted line."""
    return redact(" ".join(str(exc).split()))[:1000]
