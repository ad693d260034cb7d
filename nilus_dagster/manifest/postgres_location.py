"""A PostgreSQL sink's table location: its address, filled, and where each part comes from."""

from collections.abc import Mapping

from nilus_dagster.errors import ManifestError, Problem
from nilus_dagster.manifest.location import TableLocation
from nilus_dagster.manifest.model import Sink
from nilus_dagster.manifest.placeholders import placeholders_in
from nilus_dagster.manifest.postgres_url import PostgresUrl


def postgres_location(
    url: PostgresUrl,
    sink: Sink,
    env: Mapping[str, str],
    *,
    where: str,
    fill_secrets: bool = True,
    file: str = "(manifest)",
    connection: Mapping[str, str] | None = None,
) -> TableLocation:
    """The PostgreSQL table ``dest_table`` names in the database ``url`` names.

    ``connection`` holds parameters that replace the address's (a deployment's resource).

    Raises:
        ManifestError: ``dest_table`` is a location (those are for object stores).
        PlaceholderError: A part of the address needs a variable that is not set.
    """
    opts = sink.options
    if opts.location:
        raise ManifestError(
            [
                Problem(
                    file,
                    "spec.sink.options.dest_table",
                    f"{opts.location!r} is a location, which only object stores take; a "
                    "PostgreSQL table is named <schema>.<table> (e.g. analytics.orders)",
                )
            ]
        )
    table = f"{opts.schema_name}.{opts.table_name}"
    if fill_secrets:
        options = url.connection_options(env, where=where, replaced=connection)
    else:
        options = {**url.template_options(), **_shown_parts(connection)}
    uri = f"{url.display(_shown_parts(connection))}?table={table}"
    return TableLocation(
        uri=uri,
        storage_options=options,
        kind="postgresql",
        table=table,
        options_source=_postgres_source(where, url, connection),
    )


def _postgres_source(where: str, url: PostgresUrl, connection: Mapping[str, str] | None) -> str:
    """``where`` and what fills each part of the address, for errors that say what to fix.

    ``orders.yaml: spec.sink.address (user from {PG_USER}; password from {PG_PASSWORD})``; a
    part the deployment's resource replaces is said to come from there.
    """
    replaced = connection or {}
    written = {"user": url.user, "password": url.password, "host": url.host}
    written.update({"port": url.port, "dbname": url.dbname, **dict(url.params)})
    parts = []
    for key, value in written.items():
        if key in replaced:
            parts.append(f"{key} from the deployment's PostgreSQL resource")
        elif names := placeholders_in(value):
            parts.append(f"{key} from {', '.join('{' + n + '}' for n in names)}")
    return f"{where} ({'; '.join(parts)})" if parts else where


def _shown_parts(connection: Mapping[str, str] | None) -> dict[str, str]:
    """The parts of a deployment's connection parameters an address shows (no password)."""
    return {k: v for k, v in (connection or {}).items() if k in ("user", "host", "port", "dbname")}
