"""Health between runs: what a sensor tick records, and only when it says something new.

A tick records the lag observation when the sequence lag changed since the last one it recorded,
and otherwise at most every ``OBSERVE_EVERY_SECONDS`` (the lag chart stays continuous without a
row per tick), and the ``sequence_lag_within_bound`` check only when its result changed. What
was last recorded lives in the sensor's cursor, one entry per pipeline.
"""

import json
from dataclasses import asdict, dataclass

import dagster as dg

from nilus_dagster.dagster.constants import CHECK_SEQUENCE_LAG
from nilus_dagster.dagster.metadata import lag_metadata
from nilus_dagster.engine import LagReport
from nilus_dagster.manifest.loader import Pipeline

OBSERVE_EVERY_SECONDS = 3600.0
"""An unchanged lag is still recorded this often."""


@dataclass(frozen=True)
class Recorded:
    """What a sensor last recorded for one pipeline."""

    sequence_lag: int
    passed: bool
    observed_at: float


def read_cursor(cursor: str | None) -> dict[str, Recorded]:
    """The per-pipeline records in a sensor cursor (empty for a missing or foreign cursor)."""
    if not cursor:
        return {}
    try:
        raw = json.loads(cursor)
        return {name: Recorded(**values) for name, values in raw.get("health", {}).items()}
    except (ValueError, TypeError, AttributeError):
        return {}


def write_cursor(records: dict[str, Recorded]) -> str:
    """The sensor cursor that holds ``records`` (read back by :func:`read_cursor`)."""
    return json.dumps({"health": {name: asdict(r) for name, r in sorted(records.items())}})


def health_events(
    pipeline: Pipeline,
    key: dg.AssetKey,
    lag: LagReport,
    previous: Recorded | None,
    now: float,
) -> tuple[list[dg.AssetObservation | dg.AssetCheckEvaluation], Recorded]:
    """The events worth recording for ``lag``, and what is recorded after them."""
    max_lag = pipeline.manifest.spec.dagster.max_lag
    passed = lag.sequence_lag <= max_lag
    events: list[dg.AssetObservation | dg.AssetCheckEvaluation] = []
    observed_at = previous.observed_at if previous else 0.0
    if (
        previous is None
        or previous.sequence_lag != lag.sequence_lag
        or now - previous.observed_at >= OBSERVE_EVERY_SECONDS
    ):
        events.append(dg.AssetObservation(asset_key=key, metadata=lag_metadata(lag)))
        observed_at = now
    if previous is None or previous.passed != passed:
        events.append(
            dg.AssetCheckEvaluation(
                asset_key=key,
                check_name=CHECK_SEQUENCE_LAG,
                passed=passed,
                metadata={
                    "nats/sequence_lag": dg.MetadataValue.int(lag.sequence_lag),
                    "max_lag": dg.MetadataValue.int(max_lag),
                },
                description=None
                if passed
                else (
                    f"{lag.sequence_lag} messages on {lag.subject} are not in the table (bound "
                    f"{max_lag})"
                ),
            )
        )
    return events, Recorded(lag.sequence_lag, passed, observed_at)
