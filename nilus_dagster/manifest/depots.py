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

Without a depots file every depot is a folder under ``NILUS_LAKEHOUSE`` (default ``./.lakehouse``).
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from nilus_dagster.errors import ManifestError, Problem
from nilus_dagster.manifest.address import DIRECT_SCHEMES
from nilus_dagster.manifest.model import Sink
from nilus_dagster.manifest.placeholders import fill

DEPOTS_ENV = "NILUS_DEPOTS"
LAKEHOUSE_ENV = "NILUS_LAKEHOUSE"
DEFAULT_LAKEHOUSE = ".lakehouse"
DEAD_LETTER_SUFFIX = "__dead_letters"


@dataclass(frozen=True)
class TableLocation:
    """A Delta table's URI and the storage options ``deltalake`` needs to reach it."""

    uri: str
    storage_options: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_local(self) -> bool:
        scheme = self.uri.partition("://")[0].lower() if "://" in self.uri else "file"
        return scheme == "file"

    def sibling(self, suffix: str) -> "TableLocation":
        """The location of a table next to this one (the dead-letter table)."""
        return TableLocation(self.uri.rstrip("/") + suffix, self.storage_options)


@dataclass(frozen=True)
class Depot:
    name: str
    root: str
    storage_options: Mapping[str, str] = field(default_factory=dict)


def _absolute_root(root: str, base: Path) -> str:
    if "://" in root:
        scheme = root.partition("://")[0].lower()
        if scheme == "file":
            return str(Path(root.partition("://")[2]).resolve())
        return root.rstrip("/")
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
        data = yaml.safe_load(file.read_text())
    except OSError as exc:
        raise ManifestError(
            [Problem(where, DEPOTS_ENV, f"cannot read the depots file ({exc.strerror})")]
        ) from None
    except yaml.YAMLError as exc:
        raise ManifestError([Problem(where, "depots", f"is not valid YAML: {exc}")]) from None
    if not isinstance(data, dict) or not isinstance(data.get("depots"), dict):
        raise ManifestError(
            [Problem(where, "depots", "must be a mapping: depots: {NAME: {root: URI}}")]
        )
    depots: dict[str, Depot] = {}
    for name, entry in data["depots"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("root"), str):
            raise ManifestError(
                [Problem(where, f"depots.{name}.root", "is required: the storage root URI")]
            )
        unknown = set(entry) - {"root", "storage_options"}
        if unknown:
            raise ManifestError(
                [Problem(where, f"depots.{name}", f"unknown keys {sorted(unknown)}")]
            )
        options = entry.get("storage_options") or {}
        if not isinstance(options, dict):
            raise ManifestError(
                [Problem(where, f"depots.{name}.storage_options", "must be a mapping")]
            )
        depots[str(name)] = Depot(
            name=str(name),
            root=_absolute_root(entry["root"], file.parent),
            storage_options={str(k): str(v) for k, v in options.items()},
        )
    return depots


def resolve_table_location(
    sink: Sink,
    env: Mapping[str, str] | None = None,
    *,
    where: str = "spec.sink",
    fill_secrets: bool = True,
) -> TableLocation:
    """Resolve the Delta table a sink writes to.

    Args:
        sink: The manifest's sink.
        env: The run-time environment (``os.environ`` by default).
        where: Words naming the manifest for errors.
        fill_secrets: Fill ``{PLACEHOLDER}``s in storage options (run time). ``False`` keeps
            them as written, for display at load time.

    Raises:
        ManifestError: The depot is not in the depots file.
        PlaceholderError: A storage option needs a variable that is not set.
    """
    env = os.environ if env is None else env
    address = sink.address
    options: Mapping[str, str] = {}
    if address.is_depot:
        depots_file = env.get(DEPOTS_ENV)
        if depots_file:
            depots = load_depots(depots_file)
            depot = depots.get(address.depot or "")
            if depot is None:
                raise ManifestError(
                    [
                        Problem(
                            where,
                            "address",
                            f"depot {address.depot!r} is not in {depots_file} "
                            f"(known: {', '.join(sorted(depots)) or 'none'}); add it there",
                        )
                    ]
                )
            root, options = depot.root, depot.storage_options
        else:
            lakehouse = env.get(LAKEHOUSE_ENV) or DEFAULT_LAKEHOUSE
            root = _absolute_root(str(Path(lakehouse) / (address.depot or "")), Path.cwd())
    else:
        raw_root = address.root or ""
        scheme = raw_root.partition("://")[0].lower() if "://" in raw_root else "file"
        root = _absolute_root(raw_root, Path.cwd()) if scheme in DIRECT_SCHEMES else raw_root
    if fill_secrets:
        options = {
            k: fill(v, env, where=f"{where}: storage_options.{k}", secret=True)
            for k, v in options.items()
        }
    opts = sink.options
    uri = f"{root.rstrip('/')}/{opts.schema_name}/{opts.table_name}"
    return TableLocation(uri=uri, storage_options=dict(options))
