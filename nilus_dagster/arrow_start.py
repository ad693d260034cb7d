"""Start-up of the ``nilus-dagster`` process: no pandas for pyarrow, no BLAS threads for numpy.

The first time pyarrow converts Python values (``pa.array`` of a list, ``pa.scalar``, a
compute function given a Python value) it imports pandas, to tell pandas objects among its
inputs apart, and keeps the outcome for the life of the process. A run converts Python values
from its first statement to PostgreSQL and its first decoded batch, so every run paid for
importing pandas (0.2-0.5 CPU-s, on the critical path of a short run) that it never uses: the
engine hands pyarrow lists, numbers and strings only.

:func:`skip_pandas_probe` lets that one look fail. Nothing is patched: for an instant, the
import system refuses pandas, and pyarrow's first conversion records that it is absent. pandas
itself stays importable, and pyarrow's pandas functions (``to_pandas()``,
``Table.from_pandas``) import it when asked. Only the console script calls this: its process
runs nothing but the engine. A Dagster process, whose user code may hand pandas objects to
pyarrow, keeps pyarrow as it is.

:func:`one_blas_thread` is for the same process: pyarrow imports numpy, whose OpenBLAS starts
a thread per core that spins for a while at start-up (0.1 CPU-s a process here) though the
engine never does linear algebra. The variable that keeps it to the calling thread is only
set for that import: processes started later (Dagster's, a user's) get the environment as it
was.
"""

import contextlib
import importlib.abc
import os
import sys
from collections.abc import Iterator

_BLAS_THREADS = "OPENBLAS_NUM_THREADS"


class _RefusePandas(importlib.abc.MetaPathFinder):
    """Refuses to find pandas (installed on ``sys.meta_path`` for one conversion)."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        if fullname == "pandas" or fullname.startswith("pandas."):
            raise ImportError("pandas is not looked for by this process's pyarrow")


def skip_pandas_probe() -> bool:
    """Make pyarrow's first conversion of Python values in this process skip pandas.

    Returns:
        ``True`` when pyarrow now runs without importing pandas; ``False`` when pandas was
        imported already or pyarrow still imported it (a pyarrow that looks differently: then
        runs pay for the import as before, and nothing else changes).
    """
    if "pandas" in sys.modules:
        return False
    finder = _RefusePandas()
    sys.meta_path.insert(0, finder)
    try:
        import pyarrow as pa

        pa.array([0])
    finally:
        sys.meta_path.remove(finder)
    return "pandas" not in sys.modules


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Within the block, a first import of numpy starts OpenBLAS without worker threads.

    A value the user set is kept, and so is an OpenBLAS already loaded: both are theirs.
    """
    if _BLAS_THREADS in os.environ or "numpy" in sys.modules:
        yield
        return
    os.environ[_BLAS_THREADS] = "1"
    try:
        yield
    finally:
        os.environ.pop(_BLAS_THREADS, None)
