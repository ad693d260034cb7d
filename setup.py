"""The two compiled parts; the package's metadata is in pyproject.toml.

The pull's frame reader is nilus_dagster/jetstream/_frames.c, the decoder's join
nilus_dagster/sink/_lines.c.

Both are optional: where they cannot be compiled (no C compiler or Python headers), the install
goes on without them and the same work is done in Python (slower, the same result).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "nilus_dagster.jetstream._frames",
            ["nilus_dagster/jetstream/_frames.c"],
            optional=True,
        ),
        Extension(
            "nilus_dagster.sink._lines",
            ["nilus_dagster/sink/_lines.c"],
            optional=True,
        ),
    ]
)
