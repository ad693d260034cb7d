"""Start-up of a ``nilus-dagster`` process that runs the engine and nothing else.

:func:`start_engine_process` imports the engine the way only such a process can afford to.
Dagster processes, whose user code shares pyarrow, numpy and the collector, are left alone.

- **Without the cycle collector, then frozen.** Importing pyarrow, pydantic, nats and the
  engine makes some 70,000 objects the collector tracks, which live as long as the process;
  it ran over a hundred times while they were made (0.06-0.08 s of a 0.35 s start here).
  Once imported they are frozen, as a run and a service freeze all that is alive when they
  start (``engine.run``, ``engine.service``): without it, the first collections after the
  import would rescan them all, still young, before the run freezes them anyway.
- **No pandas for pyarrow.** The first time pyarrow converts Python values (``pa.array`` of a
  list, ``pa.scalar``, a compute function given a Python value) it imports pandas, to tell
  pandas objects among its inputs apart, and keeps the outcome for the life of the process.
  Every run did so (0.2-0.5 CPU-s, on the critical path of a short run) for a library it never
  uses: the engine hands pyarrow lists, numbers and strings only. :func:`skip_pandas_probe`
  lets that one look fail. Nothing is patched: for an instant, the import system refuses
  pandas, and pyarrow's first conversion records that it is absent. pandas itself stays
  importable, and pyarrow's pandas functions (``to_pandas()``, ``Table.from_pandas``) import
  it when asked.
- **No BLAS threads for numpy.** pyarrow imports numpy, whose OpenBLAS starts a thread per
  further core that spins for a while at start-up (0.1 CPU-s a process here), for linear
  algebra the engine never does. :func:`one_blas_thread` sets the variable that prevents it for
  that import only: processes started later (Dagster's, a user's) get the environment as it
  was.
"""

import contextlib
import gc
import importlib
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


@contextlib.contextmanager
def imports_without_gc() -> Iterator[None]:
    """Within the block, no cycle collection; afterwards, every tracked object is frozen.

    Freezing is what a long-lived process does with what its imports made: those objects stay
    until the process ends, so the collector need not scan them (``gc.freeze``). The few
    garbage cycles the imports leave (some 600 objects here) are frozen with them.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def start_engine_process() -> None:
    """Import the engine for a process that runs nothing else (see the module)."""
    with imports_without_gc(), one_blas_thread():
        importlib.import_module("nilus_dagster.engine")
        skip_pandas_probe()
