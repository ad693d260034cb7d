"""Dagster entry point: every Nilus pipeline under ``pipelines/`` (or ``NILUS_PIPELINES``).

``dagster dev`` in this folder loads it through ``workspace.yaml``; ``dagster asset list -f
definitions.py`` lists the pipelines. A manifest that does not validate is skipped and its
problems are logged (``FILE: FIELD: message``); the other pipelines still load. See
``nilus_dagster.dagster.definitions`` for that policy and ``on_invalid="fail"``.
"""

import os
from pathlib import Path

from nilus_dagster.dagster import build_nilus_definitions
from nilus_dagster.manifest.loader import PIPELINES_ENV

# Without NILUS_PIPELINES, the pipelines next to this file, whatever the working directory.
defs = build_nilus_definitions(
    None if os.environ.get(PIPELINES_ENV) else Path(__file__).resolve().parent / "pipelines"
)
