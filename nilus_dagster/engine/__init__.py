"""The engine: one run of a pipeline, a long-lived service of several, and the stream's lag.

No Dagster here.
"""

from nilus_dagster.engine.lag import measure_lag, measure_lag_async
from nilus_dagster.engine.report import LagReport, RunReport
from nilus_dagster.engine.run import Progress, run_pipeline, run_pipeline_async
from nilus_dagster.engine.service import (
    ServiceFailure,
    ServiceOptions,
    ServiceSummary,
    serve_pipelines,
    serve_pipelines_async,
)
from nilus_dagster.engine.settings import RuntimeSettings, runtime_settings

__all__ = [
    "LagReport",
    "Progress",
    "RunReport",
    "RuntimeSettings",
    "ServiceFailure",
    "ServiceOptions",
    "ServiceSummary",
    "measure_lag",
    "measure_lag_async",
    "run_pipeline",
    "run_pipeline_async",
    "runtime_settings",
    "serve_pipelines",
    "serve_pipelines_async",
]
