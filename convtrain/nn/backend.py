"""The process-wide set-up of the compiled kernels, in one place.

What the engine changes in its process, and why, all of it done by `configure()` (called by the
Trainer and by the CLI; the kernels call `compiled()`, which does the part that must come first):

* **OpenMP wait policy**: idle OpenMP threads sleep instead of spinning, unless the user chose
  otherwise. The kernels' parallel regions are long (milliseconds), so waking a sleeping thread
  costs little, while GNU OpenMP's default spin-wait burns a core after each call: against
  NumPy's BLAS threads in the rest of a training step, and against every other process on a
  shared machine (measured on 2 busy cores: 2-thread kernels used 1.2-9x the CPU time of
  1-thread ones when spinning, 1.0x with passive waiting). A short spin (GOMP_SPINCOUNT 20000,
  tens of microseconds) before sleeping still pays: a small net's step runs its parallel regions
  a few tens of microseconds apart (DIGITS at 2 threads: 63-66k images/s passive, 94k with the
  spin, the same CPU time per image). Must be set before libgomp loads with the extension.
* **Which compiled build** of ext/_conv.pyx and ext/_norm.pyx runs: setup.py compiles each
  portably (`convtrain.nn._conv`) and, on x86-64, again for x86-64-v3 (AVX2, FMA) and x86-64-v4
  (AVX-512); both modules run the same build (`compiled_module`). The wider vectors speed up the
  copies and masks around the GEMMs (im2col, col2im, ReLU) and in batch norm's passes, and the
  float32 stride-1 conv GEMMs run on convtrain's own AVX2 / AVX-512 tiles (ext/gemm_kernels.h)
  reading the image directly, where the portable build calls BLAS (`benchmarks/bench_train.py
  --isa baseline --clock cpu --threads 1` compares them). The builds give the same bits except
  the float32 conv passes, which agree to rounding (tests/nn/test_isa_variants.py says which and
  how closely). `CONVTRAIN_KERNEL_ISA` = auto (default) | baseline | x86-64-v3 | x86-64-v4
  chooses by hand.
* **BLAS pinned to one thread inside the kernels' parallel regions**: the kernels call a
  single-threaded GEMM per group of images inside an OpenMP region; a threaded BLAS there would
  oversubscribe the cores (2 x 2 threads on 2 cores). OpenBLAS with its own pthreads pool (what
  NumPy and SciPy wheels ship) is pinned by the kernels themselves, in C, with the library's
  get/set-num-threads functions registered here once; any other threaded BLAS (MKL, BLIS, ...)
  is pinned from Python through threadpoolctl by `blas_pinned_to_one_thread()` (microseconds a
  call). An OpenMP-threaded BLAS needs neither. Two Python threads calling kernels at once may
  see BLAS unpinned early (slower, still exact).
* **Freed memory kept for reuse** (glibc's malloc thresholds): a training step allocates and
  frees the same few-MiB arrays every batch; glibc hands big blocks back to the kernel when they
  are freed, so the next step takes page faults to get them back zeroed, and each unmap
  interrupts the other cores to flush their TLBs (on the MNIST net at 2 threads, over a tenth
  of each step: docs/performance.md). At most
  what a step had in use at its peak stays in the heap. Linux/glibc only; a no-op when the user
  set MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ (theirs win) or CONVTRAIN_MALLOC_DEFAULTS=1
  (`CONVTRAIN_MALLOC_DEFAULTS=1 python benchmarks/step_cost.py` measures the difference).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import importlib.util
import itertools
import os
import sys
import threading
import warnings

ISA_ENV = "CONVTRAIN_KERNEL_ISA"
# name -> (module suffix, x86-64 level the CPU needs), newest first; every compiled module
# (ext/_conv.pyx, ext/_norm.pyx) has one build per name, e.g. convtrain.nn._norm_x86_64_v4
_ISA_BUILDS = {"x86-64-v4": ("_x86_64_v4", 4), "x86-64-v3": ("_x86_64_v3", 3)}
_BASELINE_MODULE = "convtrain.nn._conv"

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20   # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 256 * 2**20
_USER_MALLOC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_lock = threading.RLock()  # compiled() is also reached while the BLAS set-up holds it
_compiled = None          # the chosen extension module
_compiled_build = None    # its build's name ("baseline", "x86-64-v3", "x86-64-v4")
_malloc_kept = None       # whether the malloc thresholds are in effect
_python_pinned = None     # threadpoolctl controllers the kernels cannot pin themselves

# OpenBLAS builds prefix or suffix their symbols (scipy_openblas..., ...64_)
_OPENBLAS_AFFIXES = list(itertools.product(("", "scipy_"), ("", "64_", "_64")))


def configure(*, keep_freed_memory: bool = True):
    """Do the process-wide set-up once (see the module docstring); returns the compiled module.

    Safe to call many times. `keep_freed_memory=False` leaves glibc's malloc as it is (kernels
    used one call at a time, outside a training loop, gain nothing from it).
    """
    module = compiled()
    if keep_freed_memory:
        keep_freed_memory_for_reuse()
    return module


def compiled():
    """The compiled kernels this process runs (loaded on first call, after OpenMP's environment
    is set)."""
    global _compiled
    if _compiled is None:
        with _lock:
            if _compiled is None:
                _set_openmp_environment()
                _compiled = load_build(_choose_build())
    return _compiled


def compiled_module(stem: str):
    """The build of ext/<stem>.pyx (e.g. "_norm") that matches the conv kernels' (compiled()),
    loaded after them: they set OpenMP's environment first."""
    compiled()
    return load_build(_compiled_build, stem)


def _set_openmp_environment() -> None:
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "20000")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# ---- which build --------------------------------------------------------------------------

def available_builds() -> list[str]:
    """The builds this CPU can run and this installation has, newest first, "baseline" last."""
    _set_openmp_environment()
    load_cython_blas()
    level = importlib.import_module(_BASELINE_MODULE).cpu_x86_64_level()
    names = []
    for name, (suffix, needs) in _ISA_BUILDS.items():
        if level >= needs and importlib.util.find_spec(_BASELINE_MODULE + suffix) is not None:
            names.append(name)
    return names + ["baseline"]


def load_build(name: str, stem: str = "_conv"):
    """The compiled module ext/<stem>.pyx of build `name` ("baseline", "x86-64-v3",
    "x86-64-v4"); the baseline build if this one was not built for `stem`."""
    load_cython_blas()
    module = f"convtrain.nn.{stem}"
    if name != "baseline" and importlib.util.find_spec(module + _ISA_BUILDS[name][0]) is not None:
        module += _ISA_BUILDS[name][0]
    return importlib.import_module(module)


def load_cython_blas():
    """scipy.linalg.cython_blas, the BLAS the kernels call, without scipy.linalg's own import.

    The kernels cimport it, so loading them imports it, and a plain import runs the package
    `scipy.linalg` first: LAPACK wrappers, scipy's array-API layer and numpy.f2py, a quarter of
    a fit's start-up, none of which a fit uses. It is loaded under a bare stand-in package
    instead, removed at once; a later `import scipy.linalg` runs the real package, which is
    then given the loaded module as its `cython_blas` (_CythonBlasAttribute)."""
    import sys

    name = "scipy.linalg.cython_blas"
    if name in sys.modules:
        return sys.modules[name]
    if "scipy.linalg" in sys.modules:
        return importlib.import_module(name)
    import types

    import scipy

    spec = importlib.util.find_spec("scipy.linalg")
    stand_in = types.ModuleType("scipy.linalg")
    stand_in.__spec__, stand_in.__path__, stand_in.__package__ = spec, spec.submodule_search_locations, "scipy.linalg"
    sys.modules["scipy.linalg"] = stand_in
    try:
        module = importlib.import_module(name)
    except Exception:  # a scipy laid out otherwise: the plain import, which costs only time
        module = None
    finally:
        if sys.modules.get("scipy.linalg") is stand_in:
            del sys.modules["scipy.linalg"]
        if vars(scipy).get("linalg") is stand_in:  # not getattr: scipy imports submodules lazily
            del scipy.linalg
    if module is None:
        return importlib.import_module(name)
    sys.meta_path.insert(0, _CythonBlasAttribute())
    return module


class _CythonBlasAttribute:
    """A finder for one import, the real `scipy.linalg`: it lets the usual finders find it and,
    once the package has run, sets its `cython_blas` to the module already loaded (the import
    system sets a submodule's attribute only when it loads the submodule), then removes itself."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "scipy.linalg":
            return None
        import sys

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.cython_blas = sys.modules["scipy.linalg.cython_blas"]

        spec.loader.exec_module = exec_module
        return spec


def _choose_build() -> str:
    global _compiled_build
    _set_openmp_environment()
    runnable = available_builds()
    wanted = os.environ.get(ISA_ENV, "auto").strip().lower() or "auto"
    if wanted != "auto" and wanted not in runnable:
        warnings.warn(f"{ISA_ENV}={wanted!r} is not available here (choose from auto, {', '.join(runnable)}); "
                      f"using {runnable[0]}", RuntimeWarning, stacklevel=3)
    _compiled_build = wanted if wanted in runnable else runnable[0]
    return _compiled_build


# ---- malloc ---------------------------------------------------------------------------------

def keep_freed_memory_for_reuse() -> bool:
    """Set glibc's malloc thresholds once per process; True if they are in effect."""
    global _malloc_kept
    if _malloc_kept is None:
        _malloc_kept = _set_malloc_thresholds()
    return _malloc_kept


def _set_malloc_thresholds() -> bool:
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _USER_MALLOC_SETTINGS):
        return False
    if os.environ.get("CONVTRAIN_MALLOC_DEFAULTS", "0") not in ("", "0"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # glibc returns 1 on success; the mmap threshold first: setting either turns off glibc's
    # dynamic adjustment of both, and a trim threshold alone made things worse (every big
    # block mmapped: 3,700 faults per MNIST step)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


# ---- BLAS threads ---------------------------------------------------------------------------

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
    load_cython_blas()  # make sure the kernels' BLAS is loaded
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
        compiled().register_blas_threads(
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
    compiled().set_num_threads(n)


def get_num_threads():
    """The number of threads convtrain's kernels use."""
    return compiled().get_num_threads()


def build_info():
    """What the kernels were built with and run on.

    Returns a dict: ``cython`` (version used to compile ext/), ``openmp`` (bool),
    ``debug_checks`` (bool: built with CONVTRAIN_DEBUG_CHECKS=1), ``isa`` (the build of the
    kernels this CPU runs: "x86-64-v4", "x86-64-v3" or "baseline"), ``isa_available`` (the
    builds this CPU could run, see available_builds()), ``max_threads``
    (OpenMP's maximum), ``num_threads`` (current kernel threads), ``omp_wait_policy``
    (PASSIVE unless the environment said otherwise), ``blas`` (the loaded BLAS
    libraries: name, version, threading layer, architecture, threads, path, and whether the
    kernels pin it to one thread in C, from Python, or need not).
    """
    from threadpoolctl import ThreadpoolController

    python_pinned = {lib.filepath for lib in _ensure_blas_pinning()}
    info = dict(compiled().compiled_with())
    info["isa_available"] = available_builds()
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


def blas_summary(libraries: list[dict]) -> str:
    """'openblas 0.3.31 (pthreads, 2 threads); ...' from build_info()['blas']: one line for
    `convtrain info` and for a run's build tag alike."""
    parts = []
    for lib in libraries:
        details = ", ".join(str(d) for d in (lib.get("threading_layer"), f"{lib.get('num_threads')} threads") if d)
        parts.append(f"{lib.get('name')} {lib.get('version')} ({details})")
    return "; ".join(parts) or "none found"
