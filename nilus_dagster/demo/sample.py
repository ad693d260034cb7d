"""The sample pipeline the demo runs (shipped as package data) and its sample orders."""

from datetime import datetime
from importlib import resources
from pathlib import Path

from nilus_dagster.manifest.loader import Pipeline, parse_pipeline

DEMO_PORT = 4333
"""The demo server's port when it is free. Not 4222: a system NATS often listens there."""

DEFAULT_STORE = ".nilus_demo"
SAMPLE_PIPELINE = Path("pipelines") / "orders-local.yaml"

# The packaged copy of pipelines/orders-local.yaml (package data next to this module), used
# where that file is not around: the demo run outside a checkout. tests/test_demo.py keeps the
# two identical.
_PACKAGED_SAMPLE = "orders-local.yaml"


def sample_pipeline_text() -> str:
    """The sample manifest as shipped with the package."""
    return resources.files("nilus_dagster.demo").joinpath(_PACKAGED_SAMPLE).read_text("utf-8")


def sample_pipeline(store: Path) -> Pipeline:
    """``pipelines/orders-local.yaml`` from the working folder, else the packaged copy.

    The copy is written into the demo's store so that ``NILUS_PIPELINES`` can point at a file.
    """
    if SAMPLE_PIPELINE.is_file():
        return parse_pipeline(SAMPLE_PIPELINE)
    copy = store / SAMPLE_PIPELINE.name
    store.mkdir(parents=True, exist_ok=True)
    copy.write_text(sample_pipeline_text(), encoding="utf-8")
    return parse_pipeline(copy)


def sample_order(number: int, now: datetime) -> dict[str, object]:
    """Order ``number``: about 230 bytes of JSON with a nested list, like a real order event."""
    return {
        "order_id": f"ord-{number:09d}",
        "customer_id": f"cust-{number * 7919 % 9973:05d}",
        "status": ("created", "paid", "shipped")[number % 3],
        "amount": round(10 + (number * 37 % 1000) * 0.37, 2),
        "currency": "EUR",
        "items": [{"sku": f"sku-{number % 211:04d}", "qty": 1 + number % 3}],
        "created_at": now.isoformat(timespec="milliseconds"),
    }
