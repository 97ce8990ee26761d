"""Build the Cython kernels in ext/ into extension modules of the convtrain package.

Project metadata lives in pyproject.toml; this file only describes the compiled parts:

* every ``ext/<name>.pyx`` becomes ``convtrain.<name>`` (e.g. ``ext/_conv.pyx`` -> ``convtrain._conv``);
* Cython compiler directives are set here, in one place (``COMPILER_DIRECTIVES``);
  ``CONVTRAIN_DEBUG_CHECKS=1`` rebuilds with bounds/wraparound/initialization/division checks on
  and without optimization, for debugging;
* OpenMP is used when the C compiler accepts it (a tiny test program is compiled and linked);
  otherwise the build still succeeds, serial, with a warning. ``convtrain.build_info()`` reports
  which one you got.
"""

import json
import os
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
    modules = []
    for pyx in sorted((HERE / "ext").glob("*.pyx")):
        modules.append(
            Extension(
                f"convtrain.{pyx.stem}",
                [str(pyx.relative_to(HERE))],
                include_dirs=[np.get_include()],
                define_macros=[
                    ("NPY_NO_DEPRECATED_API", "NPY_1_9_API_VERSION"),
                    ("CONVTRAIN_CYTHON_VERSION", f'"{cython_version}"'),
                    ("CONVTRAIN_DEBUG_CHECKS", "1" if DEBUG_CHECKS else "0"),
                ],
                extra_compile_args=optimize + omp_compile,
                extra_link_args=omp_link,
            )
        )
    return cythonize(
        modules,
        compiler_directives=COMPILER_DIRECTIVES,
        force=force_recythonize(),
        quiet=True,
    )


setup(ext_modules=extensions())
