"""The nilus_dagster benchmark: ``python -m benchmarks`` (see benchmarks/README.md)."""
