"""The asset checks every pipeline carries, evaluated from each run's report.

* ``sequence_lag_within_bound``: after the run, at most ``spec.dagster.max_lag`` messages on the
  subject are not in the table (ERROR when exceeded).
* ``no_gap``: no sequence was lost to retention or a purge before it was ingested (ERROR).
* ``dead_letters``: payloads that could not become rows; they are kept in the dead-letter table
  and never stop the pipeline, so any count is a WARN, never an ERROR.
"""

import dagster as dg

from nilus_dagster.dagster.constants import CHECK_DEAD_LETTERS, CHECK_NO_GAP, CHECK_SEQUENCE_LAG
from nilus_dagster.engine import RunReport
from nilus_dagster.manifest.depots import DEAD_LETTER_SUFFIX
from nilus_dagster.manifest.loader import Pipeline


def build_check_specs(pipeline: Pipeline, key: dg.AssetKey) -> list[dg.AssetCheckSpec]:
    """The check specs declared on the pipeline's asset."""
    max_lag = pipeline.manifest.spec.dagster.max_lag
    return [
        dg.AssetCheckSpec(
            CHECK_SEQUENCE_LAG,
            asset=key,
            description=(
                f"After a run at most {max_lag} messages on the subject are not yet in the table "
                "(spec.dagster.max_lag)."
            ),
        ),
        dg.AssetCheckSpec(
            CHECK_NO_GAP,
            asset=key,
            description="No stream sequence was removed by retention or a purge before it was "
            "ingested.",
        ),
        dg.AssetCheckSpec(
            CHECK_DEAD_LETTERS,
            asset=key,
            description="Payloads that could not become rows (kept in the dead-letter table). "
            "Warns when a run had any.",
        ),
    ]


def check_results(
    pipeline: Pipeline, key: dg.AssetKey, report: RunReport
) -> list[dg.AssetCheckResult]:
    """The three check results for one run."""
    max_lag = pipeline.manifest.spec.dagster.max_lag
    lag_ok = report.sequence_lag <= max_lag
    dead_table = report.table_uri.rstrip("/") + DEAD_LETTER_SUFFIX
    return [
        dg.AssetCheckResult(
            asset_key=key,
            check_name=CHECK_SEQUENCE_LAG,
            passed=lag_ok,
            metadata={
                "nats/sequence_lag": dg.MetadataValue.int(report.sequence_lag),
                "max_lag": dg.MetadataValue.int(max_lag),
            },
            description=None
            if lag_ok
            else (
                f"{report.sequence_lag} messages are still pending after the run (bound "
                f"{max_lag}): the pipeline falls behind; run it more often or drain "
                "(run_in_loop: true)"
            ),
        ),
        dg.AssetCheckResult(
            asset_key=key,
            check_name=CHECK_NO_GAP,
            passed=report.gap == 0,
            metadata={"nats/gap": dg.MetadataValue.int(report.gap)},
            description=None
            if report.gap == 0
            else (
                f"{report.gap} messages were removed from stream {report.stream} by retention or "
                "a purge before they were ingested; they are not in the table"
            ),
        ),
        # A dead letter is not lost data (it is kept with its error), so a run that had some
        # fails this check at WARN: visible in the UI, never an error.
        dg.AssetCheckResult(
            asset_key=key,
            check_name=CHECK_DEAD_LETTERS,
            passed=report.dead_letters == 0,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "nilus/dead_letters": dg.MetadataValue.int(report.dead_letters),
                "nilus/dead_letter_table": dg.MetadataValue.path(dead_table),
            },
            description=None
            if report.dead_letters == 0
            else (
                f"{report.dead_letters} payloads could not become rows; they are in "
                f"{dead_table} with their error"
            ),
        ),
    ]
