"""The one compiled part: nilus_dagster/jetstream/_frames.c (the metadata is in pyproject.toml).

Optional: where it cannot be compiled (no C compiler or Python headers), the install goes on
without it and the pull reads frames in Python (slower, the same result).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "nilus_dagster.jetstream._frames",
            ["nilus_dagster/jetstream/_frames.c"],
            optional=True,
        )
    ]
)
