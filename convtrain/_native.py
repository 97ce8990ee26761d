"""Which compiled build of ext/_conv.pyx this process runs.

setup.py compiles the kernels once portably (`convtrain._conv`) and, on x86-64, again for the
x86-64-v3 (AVX2, FMA) and x86-64-v4 (AVX-512) instruction sets. The GEMMs are BLAS's either way;
what the wider vectors speed up are the copies and masks around them (im2col, col2im, ReLU):
with AVX-512 a training step of the reference nets does 8-14% more images per CPU-second than
with the baseline's SSE2
(`benchmarks/bench_train.py --isa baseline --clock cpu --threads 1`).
The builds compute the same bits: their loops copy, add element by element and select, and
nothing in them can be contracted or reordered into a different rounding
(tests/test_isa_variants.py holds them to that).

`CONVTRAIN_KERNEL_ISA` = auto (default) | baseline | x86-64-v3 | x86-64-v4 chooses by hand.
"""

import importlib
import importlib.util
import os
import warnings

from convtrain import _conv as _baseline

ENV = "CONVTRAIN_KERNEL_ISA"
# name -> (module, x86-64 level the CPU needs), newest first
_VARIANTS = {"x86-64-v4": ("convtrain._conv_x86_64_v4", 4), "x86-64-v3": ("convtrain._conv_x86_64_v3", 3)}


def available():
    """The builds this CPU can run and this installation has, newest first, "baseline" last."""
    level = _baseline.cpu_x86_64_level()
    names = []
    for name, (module, needs) in _VARIANTS.items():
        if level >= needs and importlib.util.find_spec(module) is not None:
            names.append(name)
    return names + ["baseline"]


def _load(name):
    return _baseline if name == "baseline" else importlib.import_module(_VARIANTS[name][0])


def _choose():
    runnable = available()
    wanted = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if wanted == "auto":
        return _load(runnable[0])
    if wanted in runnable:
        return _load(wanted)
    warnings.warn(f"{ENV}={wanted!r} is not available here (choose from auto, {', '.join(runnable)}); "
                  f"using {runnable[0]}", RuntimeWarning, stacklevel=2)
    return _load(runnable[0])


conv = _choose()
