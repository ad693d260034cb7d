"""The NATS -> Iceberg path: ``nilus-dagster run`` into an Iceberg depot, beside the Delta one.

The same manifest as the ``cli`` path (its ``dataos://bench`` depot), with ``NILUS_DEPOTS``
pointing at a depots file that makes ``bench`` a ``type: iceberg`` depot on a local folder (the
embedded SQLite catalog). Timed as a whole process, like ``cli``; its ratio to ``cli`` in the
same round is the Iceberg sink's cost against the Delta sink's.
"""

import statistics
from pathlib import Path
from typing import Any

KEY = "cli-iceberg"
LABEL = "engine -> Iceberg: `nilus-dagster run` (whole process)"
TARGET = 0.7
"""NATS -> Iceberg at least this fraction of NATS -> Delta (``cli``), whole process."""


def env(base: dict[str, str], lakehouse: Path) -> dict[str, str]:
    """``base`` with ``NILUS_DEPOTS`` pointing at an Iceberg depot ``bench`` under
    ``lakehouse``."""
    lakehouse.mkdir(parents=True, exist_ok=True)
    depots = lakehouse / "depots.yaml"
    depots.write_text(f"depots:\n  bench:\n    type: iceberg\n    root: {lakehouse / 'iceberg'}\n")
    return {**base, "NILUS_DEPOTS": str(depots)}


def table_rows(manifest: Path, environment: dict[str, str]) -> tuple[str, int, int, int]:
    """The pipeline's Iceberg table: (location, rows, distinct sequences, max sequence), read
    with a pyiceberg scan."""
    import pyarrow.compute as pc
    from pyiceberg.catalog import load_catalog
    from pyiceberg.exceptions import NoSuchTableError

    from nilus_dagster.manifest import parse_pipeline
    from nilus_dagster.sink.iceberg_catalog import catalog_name, catalog_properties

    location = parse_pipeline(manifest).table_location(environment)
    catalog = load_catalog(catalog_name(location), **catalog_properties(location))
    try:
        table = catalog.load_table(tuple(location.table.split(".")))
    except NoSuchTableError:
        return location.uri, 0, 0, 0
    seqs = table.scan(selected_fields=("_nats_seq",)).to_arrow().column("_nats_seq")
    if not len(seqs):
        return location.uri, 0, 0, 0
    return location.uri, len(seqs), pc.count_distinct(seqs).as_py(), pc.max(seqs).as_py()


def add_delta_ratio(
    by_key: dict[str, dict[str, Any]], runs: dict[str, list[dict[str, Any]]], rounds: int
) -> None:
    """``x_delta`` of the Iceberg path: the median over rounds of its rate over ``cli``'s."""
    row = by_key.get(KEY)
    if row is None:
        return
    ratios = []
    for r in range(rounds):
        mine, delta = (
            runs[k][r]["msg_per_s"] if r < len(runs.get(k, [])) else None for k in (KEY, "cli")
        )
        if mine and delta:
            ratios.append(mine / delta)
    row["x_delta"] = statistics.median(ratios) if ratios else None
    row["x_delta_rounds"] = [round(x, 3) for x in ratios]


def targets(by_key: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    row = by_key.get(KEY, {})
    ratio = row.get("x_delta")
    if not ratio:
        return []
    return [
        {
            "target": f"NATS -> Iceberg >= {TARGET}x NATS -> Delta (whole process)",
            "measured": f"{ratio:.2f}x ({row['msg_per_s']:,.0f} msg/s; rounds "
            f"{row['x_delta_rounds']})",
            "met": ratio >= TARGET,
        }
    ]
