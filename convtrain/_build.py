"""What the compiled kernels were built with, and how many threads they use.

The kernels parallelize over the batch with OpenMP and call a single-threaded BLAS GEMM per
group of images inside that parallel region. A threaded BLAS inside an OpenMP region would
oversubscribe the cores (2 OpenMP threads x 2 BLAS threads on 2 cores), so BLAS is pinned to
one thread for the duration of each kernel call and restored afterwards:

* OpenBLAS with its own pthreads pool (what NumPy and SciPy wheels ship): the kernels do it
  themselves, in C, with the library's get/set-num-threads functions registered here once;
* any other BLAS with a thread pool (MKL, BLIS, ...): `blas_pinned_to_one_thread()` does it
  from Python through threadpoolctl (some microseconds per call).
An OpenMP-threaded BLAS needs neither: it runs single-threaded inside a parallel region.
Two Python threads calling kernels at once may see BLAS unpinned early (slower, still exact).
"""

import contextlib
import ctypes
import itertools
import os
import threading

# Idle OpenMP threads sleep instead of spinning, unless the user chose otherwise. The kernels'
# parallel regions are long (milliseconds), so waking a sleeping thread costs little, while
# GNU OpenMP's default spin-wait burns a core after each call: against NumPy's BLAS threads in
# the rest of a training step, and against every other process on a shared machine (measured
# on 2 busy cores: 2-thread kernels used 1.2-9x the CPU time of 1-thread ones when spinning,
# 1.0x with passive waiting). Must be set before libgomp loads with the extension below.
# A short spin (GNU OpenMP: GOMP_SPINCOUNT iterations, tens of microseconds) before
# sleeping still pays: a training step of a small net runs its parallel regions a few tens
# of microseconds apart, and a sleeping thread takes longer than that to wake (DIGITS at 2
# threads, idle machine: 63-66k images/s passive, 94k with 20000 spins, the same CPU time
# per image). Only when the user chose no wait policy.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "20000")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from convtrain._native import available as _available_builds, conv as _conv  # noqa: E402

_lock = threading.Lock()
_python_pinned = None  # threadpoolctl controllers the kernels cannot pin themselves

# OpenBLAS builds prefix or suffix their symbols (scipy_openblas..., ...64_)
_OPENBLAS_AFFIXES = list(itertools.product(("", "scipy_"), ("", "64_", "_64")))


def _openblas_thread_functions(lib):
    """(get, set) ctypes functions of an OpenBLAS controller, or None if not found."""
    for prefix, suffix in _OPENBLAS_AFFIXES:
        get = getattr(lib.dynlib, f"{prefix}openblas_get_num_threads{suffix}", None)
        set_ = getattr(lib.dynlib, f"{prefix}openblas_set_num_threads{suffix}", None)
        if get is not None and set_ is not None:
            return get, set_
    return None


def _setup_blas_pinning():
    """Register pthreads OpenBLAS libraries with the kernels; return the rest to pin from Python."""
    import scipy.linalg.cython_blas  # noqa: F401  (make sure the kernels' BLAS is loaded)
    from threadpoolctl import ThreadpoolController

    python_pinned = []
    for lib in ThreadpoolController().select(user_api="blas").lib_controllers:
        if getattr(lib, "threading_layer", None) == "openmp":
            continue
        functions = _openblas_thread_functions(lib) if lib.internal_api == "openblas" else None
        if functions is None:
            python_pinned.append(lib)
            continue
        get, set_ = functions
        _conv.register_blas_threads(
            ctypes.cast(get, ctypes.c_void_p).value, ctypes.cast(set_, ctypes.c_void_p).value
        )
    return python_pinned


def _ensure_blas_pinning():
    global _python_pinned
    if _python_pinned is None:
        with _lock:
            if _python_pinned is None:
                _python_pinned = _setup_blas_pinning()
    return _python_pinned


@contextlib.contextmanager
def _pin_in_python(libraries):
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


def blas_pinned_to_one_thread():
    """Context manager for a kernel call: pins the BLAS libraries the kernels cannot pin
    themselves to one thread (usually none: a no-op), then restores them."""
    libraries = _ensure_blas_pinning()
    return _pin_in_python(libraries) if libraries else contextlib.nullcontext()


def set_num_threads(n):
    """Use `n` threads (>= 1) in convtrain's kernels (OpenMP over the batch).

    Without OpenMP in the build the kernels stay serial whatever `n` is.
    The default is OpenMP's maximum (`OMP_NUM_THREADS` if set, else the number of cores).
    """
    if isinstance(n, bool) or not hasattr(n, "__index__"):
        raise TypeError(f"n must be an integer >= 1, got {n!r} of type {type(n).__name__}")
    n = n.__index__()
    if n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n}")
    _conv.set_num_threads(n)


def get_num_threads():
    """The number of threads convtrain's kernels use."""
    return _conv.get_num_threads()


def build_info():
    """What the kernels were built with and run on.

    Returns a dict: ``cython`` (version used to compile ext/), ``openmp`` (bool),
    ``debug_checks`` (bool: built with CONVTRAIN_DEBUG_CHECKS=1), ``isa`` (the build of the
    kernels this CPU runs: "x86-64-v4", "x86-64-v3" or "baseline"), ``isa_available`` (the
    builds this CPU could run, see convtrain._native), ``max_threads``
    (OpenMP's maximum), ``num_threads`` (current kernel threads), ``omp_wait_policy``
    (PASSIVE unless the environment said otherwise), ``blas`` (the loaded BLAS
    libraries: name, version, threading layer, architecture, threads, path, and whether the
    kernels pin it to one thread in C, from Python, or need not).
    """
    from threadpoolctl import ThreadpoolController

    python_pinned = {lib.filepath for lib in _ensure_blas_pinning()}
    info = dict(_conv.compiled_with())
    info["isa_available"] = _available_builds()
    info["num_threads"] = get_num_threads()
    info["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    info["blas"] = []
    for lib in ThreadpoolController().select(user_api="blas").lib_controllers:
        layer = getattr(lib, "threading_layer", None)
        info["blas"].append({
            "name": lib.internal_api,
            "prefix": lib.prefix,
            "version": lib.version,
            "threading_layer": layer,
            "architecture": getattr(lib, "architecture", None),
            "num_threads": lib.get_num_threads(),
            "filepath": lib.filepath,
            "pinned_during_kernels": (
                "not needed" if layer == "openmp"
                else "python" if lib.filepath in python_pinned else "c"
            ),
        })
    return info
