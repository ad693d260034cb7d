"""One run of a pipeline, and the stream's lag against the table. No Dagster here."""

from nilus_dagster.engine.lag import measure_lag, measure_lag_async
from nilus_dagster.engine.report import LagReport, RunReport
from nilus_dagster.engine.run import Progress, run_pipeline, run_pipeline_async
from nilus_dagster.engine.settings import RuntimeSettings, runtime_settings

__all__ = [
    "LagReport",
    "Progress",
    "RunReport",
    "RuntimeSettings",
    "measure_lag",
    "measure_lag_async",
    "run_pipeline",
    "run_pipeline_async",
    "runtime_settings",
]
