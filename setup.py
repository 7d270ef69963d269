"""Builds sparsecore._C, the C++ CPU kernels, with pybind11 and OpenMP.

The default build is portable (no -march=native): the hot kernels are compiled once for the baseline ISA, once
for AVX2+FMA and (the CSR kernels) once for AVX-512, and the widest the CPU supports is chosen at run time
(csrc/dispatch.h).
Set SPARSECORE_NATIVE=1 to opt in to -march=native for a local build.
"""
import os
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

cflags = ["-O3", "-fopenmp", "-fno-math-errno", "-std=c++17"]
if os.environ.get("SPARSECORE_NATIVE") == "1":
    cflags.append("-march=native")
if sys.platform == "darwin":  # Apple clang: OpenMP comes from libomp, if at all
    cflags = [f for f in cflags if f != "-fopenmp"] + ["-Xpreprocessor", "-fopenmp"]
    lflags = ["-lomp"]
else:
    lflags = ["-fopenmp"]

ext = Pybind11Extension(
    "sparsecore._C",
    sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp")),
    include_dirs=["csrc"],
    # Headers hold the kernel bodies: list them so that editing one rebuilds the extension.
    depends=sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".h")),
    extra_compile_args=cflags,
    extra_link_args=lflags,
    cxx_std=17,
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
