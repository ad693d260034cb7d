"""Moments in time as the package stores and compares them: aware, in UTC."""

from datetime import datetime, timezone


def as_utc(moment: datetime) -> datetime:
    """``moment`` in UTC; a naive time is taken as UTC already (Dagster's windows are)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)
