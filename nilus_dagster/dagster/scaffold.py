"""What ``dg scaffold defs nilus_dagster.dagster.NilusPipelinesComponent PATH`` writes.

That is a defs.yaml that loads the manifests next to it, and one sample manifest to start from.
"""

import dagster as dg
from dagster.components.component_scaffolding import scaffold_component

SAMPLE_MANIFEST = """\
# A sample Nilus stream pipeline: JetStream stream `orders-stream`, subject `orders.created`,
# into the Delta table analytics.orders under the depot `lakehouse` (a folder under
# NILUS_LAKEHOUSE, ./.lakehouse by default, when no depots file is set). Edit the address and
# the names, then check it with `nilus-dagster validate` and `dg check defs`.
name: orders
version: v1alpha
type: nilus
description: Orders from JetStream into the lakehouse.
spec:
  type: stream
  source:
    address: nats+jetstream://localhost:4222?subject=orders.created&batch_size=500&timeout=10
    options:
      source_table: orders-stream
      run_in_loop: true
  sink:
    address: dataos://lakehouse?purpose=rw
    options:
      dest_table: analytics.orders
      incremental_strategy: append
  dagster:
    partitions_start: "{today}"   # the first daily partition: the day the stream starts
"""


class NilusPipelinesScaffolder(dg.Scaffolder):
    """Writes ``defs.yaml`` (``pipelines: [pipelines]``) and ``pipelines/orders.yaml``."""

    def scaffold(self, request: dg.ScaffoldRequest) -> None:
        """Write defs.yaml and ``pipelines/`` with a sample manifest at the request's path."""
        from datetime import datetime, timezone

        scaffold_component(request, {"pipelines": ["pipelines"]})
        folder = request.target_path / "pipelines"
        folder.mkdir(parents=True, exist_ok=True)
        sample = folder / "orders.yaml"
        if not sample.exists():
            today = datetime.now(timezone.utc).date().isoformat()
            sample.write_text(SAMPLE_MANIFEST.replace("{today}", today))
