"""Declares the Cython extensions; everything else is in setup.cfg / pyproject.toml.

Environment switches:
  HASHEMB_DEBUG=1    bounds checks on in every kernel (slow; for debugging)
  HASHEMB_NATIVE=1   -march=native (faster on this machine, not portable)
  HASHEMB_NO_OPENMP=1  build single-threaded kernels
  HASHEMB_ASAN=1     AddressSanitizer + UndefinedBehaviorSanitizer build (run
                     Python with libasan preloaded: scripts/asan)
"""
import glob
import os
import subprocess
import sys
import sysconfig
import tempfile
import warnings

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def openmp_flags():
    """-fopenmp if the compiler links a test program with it, else none (loudly)."""
    if os.environ.get("HASHEMB_NO_OPENMP"):
        return []
    cc = sysconfig.get_config_var("CC") or "cc"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void){return omp_get_max_threads() < 1;}\n")
        cmd = cc.split() + ["-fopenmp", src, "-o", os.path.join(tmp, "t")]
        try:
            ok = subprocess.run(cmd, capture_output=True).returncode == 0
        except OSError:
            ok = False
    if not ok:
        warnings.warn("hashemb: the C compiler has no OpenMP; kernels run on one thread")
        return []
    return ["-fopenmp"]


omp = openmp_flags()
# the sanitizer build at -O1, as ASan advises: it compiles in a third of
# the time (about 1 min on 2 cores against 2.8) and checks the same accesses
cflags = ["-O1" if os.environ.get("HASHEMB_ASAN") else "-O3"] + omp
if os.environ.get("HASHEMB_NATIVE"):
    cflags.append("-march=native")
debug = bool(os.environ.get("HASHEMB_DEBUG"))
asan = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
        "-fno-omit-frame-pointer"] if os.environ.get("HASHEMB_ASAN") else []
cflags += asan

extensions = [
    Extension(
        f"hashemb._cpu.{name}",
        [f"hashemb/_cpu/{name}.pyx"],
        include_dirs=[os.path.join(HERE, "hashemb", "_include"),
                      os.path.join(HERE, "hashemb", "_cpu")],
        extra_compile_args=cflags,
        extra_link_args=omp + asan,
        # the shared headers: an edit to one rebuilds the modules
        depends=sorted(glob.glob(os.path.join(HERE, "hashemb", "_include", "hashemb", "*.h"))
                       + glob.glob(os.path.join(HERE, "hashemb", "_cpu", "*.h"))),
    )
    for name in ("_slots", "_bag", "_embed", "_tt")
]

setup(
    # the four modules compile side by side (pip install runs build_ext
    # without -j: 67 s one at a time against 37 s on 2 cores), and so does
    # Cython's translation (9 s one at a time)
    options={"build_ext": {"parallel": os.cpu_count() or 1}},
    ext_modules=cythonize(
        extensions,
        nthreads=os.cpu_count() or 1,
        compiler_directives={
            "language_level": 3,
            "boundscheck": debug,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": debug,
            "embedsignature": True,
        },
    ),
)
