"""Build the Cython kernels in ext/ into extension modules of the convtrain package.

Project metadata lives in pyproject.toml; this file only describes the compiled parts:

* every ``ext/<name>.pyx`` becomes ``convtrain.nn.<name>`` (e.g. ``ext/_conv.pyx`` -> ``convtrain.nn._conv``);
* Cython compiler directives are set here, in one place (``COMPILER_DIRECTIVES``);
  ``CONVTRAIN_DEBUG_CHECKS=1`` rebuilds with bounds/wraparound/initialization/division checks on
  and without optimization, for debugging;
* OpenMP is used when the C compiler accepts it (a tiny test program is compiled and linked);
  otherwise the build still succeeds, serial, with a warning. ``convtrain.build_info()`` reports
  which one you got.
* on x86-64 with gcc or clang, ``ext/_conv.pyx`` and ``ext/_norm.pyx`` are also compiled for the
  x86-64-v3 (AVX2, FMA) and x86-64-v4 (AVX-512) instruction sets, as
  ``convtrain.nn._conv_x86_64_v3``, ``convtrain.nn._norm_x86_64_v4`` and so on: the same
  source, with wider vectors in the loops around the GEMMs (im2col, col2im, ReLU masks) and
  in batch norm's passes, and convtrain's own AVX2 / AVX-512 float32 GEMM tiles
  (ext/gemm_kernels.h) for the stride-1 conv passes; float32 conv results agree with the
  portable build's (BLAS) to rounding, everything else bit for bit (see convtrain/nn/backend.py
  and tests/nn/test_isa_variants.py). The baseline module stays portable; the CPU picks among
  them at import time. ``CONVTRAIN_NO_ISA_VARIANTS=1`` builds the baseline only.
"""

import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path

import numpy as np
from Cython import __version__ as cython_version
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools._distutils.ccompiler import new_compiler
from setuptools._distutils.errors import CompileError, LinkError
from setuptools._distutils.sysconfig import customize_compiler

HERE = Path(__file__).resolve().parent
DEBUG_CHECKS = os.environ.get("CONVTRAIN_DEBUG_CHECKS", "0") not in ("", "0", "false", "no")

COMPILER_DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG_CHECKS,
    "wraparound": DEBUG_CHECKS,
    "initializedcheck": DEBUG_CHECKS,
    # C semantics for / and % (the kernels only divide non-negative indices);
    # the debug build checks for division by zero instead.
    "cdivision": not DEBUG_CHECKS,
    "embedsignature": True,
}


def openmp_flags():
    """Return (compile_args, link_args) for OpenMP, or ([], []) if the compiler has none."""
    if os.environ.get("CONVTRAIN_NO_OPENMP", "0") not in ("", "0"):
        print("convtrain: CONVTRAIN_NO_OPENMP is set; building the kernels serial")
        return [], []
    compiler = new_compiler()
    customize_compiler(compiler)
    if compiler.compiler_type == "msvc":
        candidates = [(["/openmp"], [])]
    else:
        candidates = [(["-fopenmp"], ["-fopenmp"])]
        if sys.platform == "darwin":  # Apple clang needs libomp from Homebrew
            candidates.append((["-Xpreprocessor", "-fopenmp"], ["-lomp"]))
    probe = textwrap.dedent(
        """
        #include <omp.h>
        int main(void) {
            int n = 0;
            #pragma omp parallel reduction(+:n)
            n += 1;
            return omp_get_max_threads() > 0 && n > 0 ? 0 : 1;
        }
        """
    )
    tmpdir = tempfile.mkdtemp(prefix="convtrain-omp-")
    try:
        source = os.path.join(tmpdir, "probe.c")
        with open(source, "w") as fh:
            fh.write(probe)
        for compile_args, link_args in candidates:
            try:
                objects = compiler.compile([source], output_dir=tmpdir, extra_postargs=compile_args)
                # link_executable ignores LDFLAGS, which the extensions do get (e.g. sanitizers)
                compiler.link_executable(
                    objects, "probe", output_dir=tmpdir,
                    extra_postargs=link_args + os.environ.get("LDFLAGS", "").split(),
                )
                return compile_args, link_args
            except (CompileError, LinkError):
                continue
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    warnings.warn(
        "convtrain: the C compiler does not support OpenMP; building the kernels serial "
        "(one thread). Install an OpenMP-capable compiler (gcc, or clang with libomp) for speed.",
        stacklevel=1,
    )
    return [], []


# Extra builds for newer x86-64 CPUs: module suffix -> compiler flag, and the modules built so.
ISA_VARIANTS = {"x86_64_v3": "-march=x86-64-v3", "x86_64_v4": "-march=x86-64-v4"}
ISA_VARIANT_MODULES = ("_conv", "_norm")


def isa_variant_flags():
    """{suffix: flag} of the variants this compiler can build here ({} off x86-64, on MSVC, or
    when CONVTRAIN_NO_ISA_VARIANTS is set)."""
    if os.environ.get("CONVTRAIN_NO_ISA_VARIANTS", "0") not in ("", "0") or DEBUG_CHECKS:
        return {}
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    compiler = new_compiler()
    customize_compiler(compiler)
    if compiler.compiler_type == "msvc":
        return {}
    usable = {}
    tmpdir = tempfile.mkdtemp(prefix="convtrain-isa-")
    try:
        source = os.path.join(tmpdir, "probe.c")
        with open(source, "w") as fh:
            fh.write("int convtrain_probe(float *x, int n) { for (int i = 0; i < n; i++) x[i] *= 2; return n; }\n")
        for suffix, flag in ISA_VARIANTS.items():
            try:
                compiler.compile([source], output_dir=os.path.join(tmpdir, suffix), extra_postargs=[flag])
                usable[suffix] = flag
            except CompileError:
                print(f"convtrain: the C compiler does not accept {flag}; not building the {suffix} modules")
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return usable


def force_recythonize():
    """True when the directive set differs from the last build, so .c files must be regenerated."""
    stamp = HERE / "build" / "convtrain-cython-directives.json"
    wanted = json.dumps({"directives": COMPILER_DIRECTIVES, "cython": cython_version}, sort_keys=True)
    previous = stamp.read_text() if stamp.exists() else None
    try:
        stamp.parent.mkdir(exist_ok=True)
        stamp.write_text(wanted)
    except OSError:  # read-only source tree: just regenerate
        return True
    return previous != wanted


def extensions():
    omp_compile, omp_link = openmp_flags()
    if DEBUG_CHECKS:
        optimize = ["-O0", "-g"] if os.name != "nt" else ["/Od"]
    else:
        optimize = ["-O3"] if os.name != "nt" else ["/O2"]
    force = force_recythonize()

    def extension(name, pyx, isa_flag=None, isa="baseline"):
        # batch norm's sums must round alike in every build: no fused multiply-adds where the
        # ISA has them (ext/norm_rows.h); MSVC contracts only under /fp:fast
        exact = ["-ffp-contract=off"] if pyx.stem == "_norm" and os.name != "nt" else []
        return Extension(
            name,
            [str(pyx.relative_to(HERE))],
            # ext/ for the C helpers the .pyx files include (conv_support.h); a change to a
            # header or an included .pxi (winograd.pxi) rebuilds the modules
            include_dirs=[np.get_include(), "ext"],
            depends=[str(h.relative_to(HERE)) for h in sorted((HERE / "ext").glob("*.h"))]
            + [str(h.relative_to(HERE)) for h in sorted((HERE / "ext").glob("*.pxi"))],
            define_macros=[
                ("NPY_NO_DEPRECATED_API", "NPY_1_9_API_VERSION"),
                ("CONVTRAIN_CYTHON_VERSION", f'"{cython_version}"'),
                ("CONVTRAIN_DEBUG_CHECKS", "1" if DEBUG_CHECKS else "0"),
                ("CONVTRAIN_ISA", f'"{isa}"'),
            ],
            extra_compile_args=optimize + omp_compile + exact + ([isa_flag] if isa_flag else []),
            extra_link_args=omp_link,
        )

    modules = [extension(f"convtrain.nn.{pyx.stem}", pyx) for pyx in sorted((HERE / "ext").glob("*.pyx"))]
    built = cythonize(modules, compiler_directives=COMPILER_DIRECTIVES, force=force, quiet=True)
    for (suffix, flag), stem in itertools.product(isa_variant_flags().items(), ISA_VARIANT_MODULES):
        # same source, own module name: its C file goes to its own folder, not beside the .pyx
        variant = extension(f"convtrain.nn.{stem}_{suffix}", HERE / "ext" / f"{stem}.pyx", flag,
                            suffix.replace("_", "-"))
        (compiled,) = cythonize([variant], compiler_directives=COMPILER_DIRECTIVES, force=force,
                                quiet=True, build_dir=str(Path("build") / f"cython-{suffix}"))
        # cythonize caches what it read about a source file and merges the first variant's
        # flags into the next one's: state them again
        compiled.define_macros = variant.define_macros
        compiled.extra_compile_args = variant.extra_compile_args
        built.append(compiled)
    return built


setup(ext_modules=extensions())
