"""What the compiled kernels were built with, and how many threads they use.

The kernels parallelize over the batch with OpenMP and call a single-threaded BLAS GEMM per
image inside that parallel region. A threaded BLAS inside an OpenMP region would oversubscribe
the cores (2 OpenMP threads x 2 BLAS threads on 2 cores), so `blas_pinned_to_one_thread()`
pins every loaded BLAS library to one thread for the duration of a kernel call and restores
the previous setting afterwards (a few microseconds per call).
"""

import contextlib
import threading

from convtrain import _conv

_controller_lock = threading.Lock()
_blas_controllers = None  # threadpoolctl controllers of the BLAS libraries, found once


def _blas_libraries():
    global _blas_controllers
    if _blas_controllers is None:
        with _controller_lock:
            if _blas_controllers is None:
                import scipy.linalg.cython_blas  # noqa: F401  (make sure scipy's BLAS is loaded)
                from threadpoolctl import ThreadpoolController

                _blas_controllers = ThreadpoolController().select(user_api="blas").lib_controllers
    return _blas_controllers


@contextlib.contextmanager
def blas_pinned_to_one_thread():
    """Run the body with every BLAS library limited to one thread, then restore."""
    libraries = _blas_libraries()
    previous = [lib.get_num_threads() for lib in libraries]
    try:
        for lib, n in zip(libraries, previous):
            if n != 1:
                lib.set_num_threads(1)
        yield
    finally:
        for lib, n in zip(libraries, previous):
            if n != 1:
                lib.set_num_threads(n)


def set_num_threads(n):
    """Use `n` threads (>= 1) in convtrain's kernels (OpenMP over the batch).

    Without OpenMP in the build the kernels stay serial whatever `n` is.
    The default is OpenMP's maximum (`OMP_NUM_THREADS` if set, else the number of cores).
    """
    if isinstance(n, bool) or not isinstance(n, int) and not hasattr(n, "__index__"):
        raise TypeError(f"n must be an integer >= 1, got {n!r} of type {type(n).__name__}")
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n}")
    _conv.set_num_threads(n)


def get_num_threads():
    """The number of threads convtrain's kernels use."""
    return _conv.get_num_threads()


def build_info():
    """What the kernels were built with and run on.

    Returns a dict: ``cython`` (version used to compile ext/), ``openmp`` (bool),
    ``debug_checks`` (bool: built with CONVTRAIN_DEBUG_CHECKS=1), ``max_threads``
    (OpenMP's maximum), ``num_threads`` (current kernel threads), ``blas`` (list of the
    loaded BLAS libraries: name, version, threading layer, architecture, threads, path).
    """
    info = dict(_conv.compiled_with())
    info["num_threads"] = get_num_threads()
    info["blas"] = [
        {
            "name": lib.internal_api,
            "prefix": lib.prefix,
            "version": lib.version,
            "threading_layer": getattr(lib, "threading_layer", None),
            "architecture": getattr(lib, "architecture", None),
            "num_threads": lib.get_num_threads(),
            "filepath": lib.filepath,
        }
        for lib in _blas_libraries()
    ]
    return info
