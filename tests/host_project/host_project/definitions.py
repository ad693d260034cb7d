"""The host's code location: its executor, resources and io_manager, its own assets, and the
Nilus pipelines of the ``dg`` defs folder (``defs/ingest/defs.yaml``) merged in."""

import os
from pathlib import Path

import dagster as dg

from host_project.host_assets import daily_orders, order_count, orders_audit, unrelated


class Greeting(dg.ConfigurableResource):
    """A resource of the host's own, under a key of its own."""

    text: str = "hello"


host = dg.Definitions(
    assets=[unrelated, daily_orders, order_count, orders_audit],
    resources={
        "greeting": Greeting(),
        "io_manager": dg.FilesystemIOManager(base_dir=os.environ.get("HOST_STORAGE", "storage")),
    },
    executor=dg.multiprocess_executor.configured({"max_concurrent": 2}),
)


@dg.definitions
def defs() -> dg.Definitions:
    nilus = dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
    return dg.Definitions.merge(host, nilus)
