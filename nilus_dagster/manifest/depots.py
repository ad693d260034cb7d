"""Where a sink's table lives: ``dataos://`` depots resolved to storage roots.

With ``NILUS_DEPOTS`` pointing at a YAML file, each depot maps to a storage root and its
``deltalake`` storage options (values may hold ``{PLACEHOLDER}``s, filled at run time):

.. code-block:: yaml

    depots:
      orders-lakehouse:
        root: s3://analytics-lake/nilus
        storage_options:
          AWS_REGION: eu-west-1
          AWS_ACCESS_KEY_ID: "{AWS_ACCESS_KEY_ID}"
          AWS_SECRET_ACCESS_KEY: "{AWS_SECRET_ACCESS_KEY}"

A depot's ``type`` is ``delta`` (the default) or ``iceberg``; an Iceberg depot names its
pyiceberg ``catalog`` properties (placeholders allowed), which default to an embedded SQLite
catalog at ``<root>/catalog.db`` for a local root. A relative ``root`` is relative to the depots
file. Without a depots file every depot is a folder
under ``NILUS_LAKEHOUSE`` (default ``./.lakehouse``). Either way ``dest_table: schema.table`` is the
Delta table at ``<root>/<schema>/<table>``. A fully qualified ``dest_table`` (``s3://lake/x/orders``
or ``/data/lake/orders``) is the table's location itself, on the same store as the depot's root
(whose storage options reach it); its dead letters are the sibling ``<location>__dead_letters``.
"""

import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from nilus_dagster.errors import ManifestError, Problem
from nilus_dagster.manifest.address import DIRECT_SCHEMES, AddressError
from nilus_dagster.manifest.location import TableLocation
from nilus_dagster.manifest.model import Sink
from nilus_dagster.manifest.placeholders import fill, placeholders_in
from nilus_dagster.manifest.postgres_location import postgres_location
from nilus_dagster.manifest.postgres_url import PostgresUrl, parse_postgres_url
from nilus_dagster.manifest.yaml_text import field_key, load_yaml
from nilus_dagster.redaction import register_secret

DEPOTS_ENV = "NILUS_DEPOTS"
LAKEHOUSE_ENV = "NILUS_LAKEHOUSE"
DEFAULT_LAKEHOUSE = ".lakehouse"
DEAD_LETTER_SUFFIX = "__dead_letters"

# Schemes that reach one kind of store: a fully qualified dest_table must be on the store its
# depot's storage options are for.
_STORES = {
    "file": "a local folder",
    "s3": "S3",
    "s3a": "S3",
    "gs": "Google Cloud Storage",
    "gcs": "Google Cloud Storage",
    "az": "Azure storage",
    "abfs": "Azure storage",
    "abfss": "Azure storage",
    "adl": "Azure storage",
    "azure": "Azure storage",
}
# Storage options whose literal values are secrets (placeholders are registered when filled).
_SECRET_OPTION = re.compile(r"SECRET|TOKEN|PASSWORD|ACCOUNT_KEY|SAS|SERVICE_ACCOUNT_KEY", re.I)


ICEBERG_CATALOG_FILE = "catalog.db"
"""The embedded SQLite catalog of an Iceberg depot with a local root and no ``catalog``."""


DEPOT_TYPES = ("delta", "iceberg", "postgresql")
"""The depot ``type``s a sink writer serves (``delta`` when a depot names none)."""
_DEPOT_KEYS = {
    "delta": ("type", "root", "storage_options"),
    "iceberg": ("type", "root", "storage_options", "catalog"),
    "postgresql": ("type", "url"),
}


@dataclass(frozen=True)
class Depot:
    """A named storage root (from the depots file) that ``dataos://`` addresses refer to."""

    name: str
    root: str
    storage_options: Mapping[str, str] = field(default_factory=dict)
    type: str = "delta"
    url: PostgresUrl | None = None
    catalog: Mapping[str, str] = field(default_factory=dict)


def _absolute_root(root: str, base: Path) -> str:
    if "://" in root:
        scheme, _, rest = root.partition("://")
        if scheme.lower() != "file":
            return root.rstrip("/")
        root = rest
    path = Path(root).expanduser()
    if not path.is_absolute():
        path = base / path
    return str(path.resolve())


def load_depots(path: str | os.PathLike[str]) -> dict[str, Depot]:
    """Read a depots file.

    Raises:
        ManifestError: The file is missing, not YAML, or not of the documented shape.
    """
    file = Path(path)
    where = str(file)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ManifestError(
            [
                Problem(
                    where,
                    "(file)",
                    f"cannot read the depots file ({reason}); fix {DEPOTS_ENV} or the file",
                )
            ]
        ) from None
    data = load_yaml(text, where)
    if not isinstance(data, dict) or not isinstance(data.get("depots"), dict):
        raise ManifestError(
            [
                Problem(
                    where,
                    "depots",
                    "is missing or not a mapping: a depots file holds "
                    "depots: {<depot>: {root: <URI or folder>, storage_options: {...}}}",
                )
            ]
        )
    problems: list[Problem] = []
    depots: dict[str, Depot] = {}
    for name, entry in data["depots"].items():
        field_name = f"depots.{field_key(name)}"
        if not isinstance(entry, dict):
            problems.append(
                Problem(where, field_name, "must be a mapping: {root: <URI or folder>}")
            )
            continue
        kind = entry.get("type", "delta")
        if kind not in DEPOT_TYPES:
            problems.append(
                Problem(
                    where,
                    f"{field_name}.type",
                    f"must be one of {', '.join(DEPOT_TYPES)} (delta when left out), got {kind!r}",
                )
            )
            continue
        keys = _DEPOT_KEYS[kind]
        unknown = sorted(str(k) for k in entry if k not in keys)
        if unknown:
            problems.append(
                Problem(
                    where,
                    f"{field_name}.{field_key(unknown[0])}",
                    f"is not a known key of a {kind} depot; it has {', '.join(keys)}",
                )
            )
        if kind == "postgresql":
            depot = _postgres_depot(str(name), entry, where, field_name, problems)
            if depot is not None:
                depots[depot.name] = depot
            continue
        root = entry.get("root")
        if not isinstance(root, str) or not root.strip():
            problems.append(
                Problem(
                    where,
                    f"{field_name}.root",
                    "is required: the storage root (s3://bucket/prefix, or a folder)",
                )
            )
            continue
        options = entry.get("storage_options") or {}
        if not isinstance(options, dict):
            problems.append(
                Problem(where, f"{field_name}.storage_options", "must be a mapping of text")
            )
            continue
        bad = [k for k, v in options.items() if not isinstance(v, str | int | float | bool)]
        for key in bad:
            problems.append(
                Problem(
                    where,
                    f"{field_name}.storage_options.{field_key(key)}",
                    'must be text (quote it; a secret goes in as "{VARIABLE}")',
                )
            )
        if bad:
            continue
        absolute_root = _absolute_root(root.strip(), file.parent)
        catalog = _catalog_properties(entry, kind, absolute_root, where, field_name, problems)
        if catalog is None:
            continue
        depots[str(name)] = Depot(
            name=str(name),
            root=absolute_root,
            storage_options=_text_values(options),
            type=kind,
            catalog=catalog,
        )
    if problems:
        raise ManifestError(problems)
    return depots


def _postgres_depot(
    name: str, entry: Mapping[str, object], where: str, field_name: str, problems: list[Problem]
) -> Depot | None:
    url = entry.get("url")
    if not isinstance(url, str) or not url.strip():
        problems.append(
            Problem(
                where,
                f"{field_name}.url",
                "is required: postgresql://USER[:PASSWORD]@HOST[:PORT]/DB (a secret goes in as "
                '"{VARIABLE}")',
            )
        )
        return None
    try:
        parsed = parse_postgres_url(url)
    except AddressError as exc:
        problems.append(Problem(where, f"{field_name}.url", f"{exc.part}: {exc}"))
        return None
    return Depot(name=name, root="", type="postgresql", url=parsed)


def _text_values(mapping: Mapping[object, object]) -> dict[str, str]:
    return {str(k): (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in mapping.items()}


def _catalog_properties(
    entry: Mapping[str, object],
    kind: str,
    root: str,
    where: str,
    field_name: str,
    problems: list[Problem],
) -> dict[str, str] | None:
    """An Iceberg depot's catalog properties (placeholders kept), ``None`` after a problem."""
    catalog = entry.get("catalog")
    if kind != "iceberg":
        return {}  # a catalog key on another depot is reported as an unknown key
    if catalog is None:
        if "://" in root:
            problems.append(
                Problem(
                    where,
                    f"{field_name}.catalog",
                    f"is required for an Iceberg depot on {root.partition('://')[0]}:// (only a "
                    "local root gets the embedded SQLite catalog): add catalog: {uri: "
                    '"postgresql+psycopg2://{PG_USER}:{PG_PASSWORD}@HOST:5432/DB"}',
                )
            )
            return None
        return {"uri": f"sqlite:///{Path(root) / ICEBERG_CATALOG_FILE}"}
    if not isinstance(catalog, dict) or not all(
        isinstance(v, str | int | float | bool) for v in catalog.values()
    ):
        problems.append(
            Problem(
                where,
                f"{field_name}.catalog",
                "must be a mapping of pyiceberg catalog properties to text, e.g. {uri: "
                '"postgresql+psycopg2://{PG_USER}:{PG_PASSWORD}@HOST:5432/DB"}',
            )
        )
        return None
    if "uri" not in catalog and "type" not in catalog:
        problems.append(
            Problem(
                where,
                f"{field_name}.catalog.uri",
                "is required: the SQL catalog's database URL (sqlite:///... or "
                "postgresql+psycopg2://...), or give the catalog's type and its properties",
            )
        )
        return None
    return _text_values(catalog)


def resolve_table_location(
    sink: Sink,
    env: Mapping[str, str] | None = None,
    *,
    file: str = "(manifest)",
    fill_secrets: bool = True,
    connection: Mapping[str, str] | None = None,
) -> TableLocation:
    """Resolve the Delta table a sink writes to.

    Args:
        sink: The manifest's sink.
        env: The run-time environment (``os.environ`` by default).
        file: The manifest's file, named in errors.
        fill_secrets: Fill ``{PLACEHOLDER}``s in storage options (run time). ``False`` keeps
            them as written, for display at load time.
        connection: libpq parameters that replace a PostgreSQL address's (a deployment's
            resource); their parts of the address need no variable then.

    Raises:
        ManifestError: The depots file is malformed or does not hold the sink's depot.
        PlaceholderError: A storage option needs a variable that is not set.
    """
    env = os.environ if env is None else env
    address = sink.address
    to_postgres = functools.partial(
        postgres_location,
        sink=sink,
        env=env,
        fill_secrets=fill_secrets,
        file=file,
        connection=connection,
    )
    options: Mapping[str, str] = {}
    options_where = ""
    kind, catalog, catalog_where = "delta", {}, ""
    if address.is_depot:
        depots_file = env.get(DEPOTS_ENV)
        if depots_file:
            depots = load_depots(depots_file)
            depot = depots.get(address.depot or "")
            if depot is None:
                raise ManifestError(
                    [
                        Problem(
                            file,
                            "spec.sink.address",
                            f"depot {address.depot!r} is not in the depots file {depots_file} "
                            f"({DEPOTS_ENV}; it has: {', '.join(sorted(depots)) or 'none'}): "
                            "add it there or fix the depot name",
                        )
                    ]
                )
            if depot.url is not None:
                where = f"{depots_file}: depots.{depot.name}.url (for {file})"
                return to_postgres(depot.url, where=where)
            root, options = depot.root, depot.storage_options
            options_where = f"{depots_file}: depots.{depot.name}.storage_options"
            kind, catalog = depot.type, depot.catalog
            catalog_where = f"{depots_file}: depots.{depot.name}.catalog"
        else:
            lakehouse = env.get(LAKEHOUSE_ENV) or DEFAULT_LAKEHOUSE
            root = _absolute_root(str(Path(lakehouse) / (address.depot or "")), Path.cwd())
    elif address.postgres is not None:
        return to_postgres(address.postgres, where=f"{file}: spec.sink.address")
    else:
        raw_root = address.root or ""
        scheme = raw_root.partition("://")[0].lower() if "://" in raw_root else "file"
        root = _absolute_root(raw_root, Path.cwd()) if scheme in DIRECT_SCHEMES else raw_root
    source = _options_source(options_where, options)
    if fill_secrets:
        filled = {}
        for key, value in options.items():
            filled[key] = fill(value, env, where=f"{options_where}.{key} (for {file})", secret=True)
            if _SECRET_OPTION.search(key):
                register_secret(filled[key])
        options = filled
        catalog = {
            k: fill(v, env, where=f"{catalog_where}.{k} (for {file})", secret=True)
            for k, v in catalog.items()
        }
    opts = sink.options
    if opts.location:
        uri = _dest_location(opts.location, root, file)
    else:
        uri = f"{root.rstrip('/')}/{opts.schema_name}/{opts.table_name}"
    return TableLocation(
        uri=uri,
        storage_options=dict(options),
        kind=kind,
        table=opts.qualified_name if kind == "iceberg" else "",
        catalog=dict(catalog),
        options_source=source,
    )


def _store_of(uri: str) -> str:
    scheme = uri.partition("://")[0].lower() if "://" in uri else "file"
    return _STORES.get(scheme, scheme)


def _dest_location(location: str, root: str, file: str) -> str:
    """A fully qualified ``dest_table``: the table's location, on its depot's store."""
    if _store_of(location) != _store_of(root):
        raise ManifestError(
            [
                Problem(
                    file,
                    "spec.sink.options.dest_table",
                    f"{location!r} is on {_store_of(location)}, but the sink's storage root "
                    f"{root} is on {_store_of(root)}, so its storage options cannot reach it: "
                    "address a depot whose root is on the same store (NILUS_DEPOTS), or write "
                    "dest_table: <schema>.<table> to place the table under the root",
                )
            ]
        )
    if _store_of(location) == "a local folder":
        return _absolute_root(location, Path.cwd())
    return location


def _options_source(where: str, options: Mapping[str, str]) -> str:
    if not where:
        return ""
    filled = [
        f"{key} from {', '.join('{' + name + '}' for name in names)}"
        for key, value in options.items()
        if (names := placeholders_in(value))
    ]
    return f"{where} ({'; '.join(filled)})" if filled else where
