"""Build the Cython extensions of fastlb.

One place for build knobs: compiler flags and Cython directives live here.
FASTLB_DEBUG=1 builds without optimisation, with assertions and debug symbols.
"""

import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("FASTLB_DEBUG") == "1"
HERE = os.path.dirname(os.path.abspath(__file__))
INCLUDES = os.path.join("src", "fastlb", "includes")

cflags = ["-D_GNU_SOURCE", "-Wall", "-Wno-unused-function", "-Wno-unreachable-code"]
if DEBUG:
    cflags += ["-O0", "-g3", "-DFLB_DEBUG=1"]
else:
    cflags += ["-O2", "-g", "-DNDEBUG"]

directives = {
    "language_level": "3",
    "boundscheck": DEBUG,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": DEBUG,
    "embedsignature": True,
}

extensions = []
for pyx in sorted(glob.glob(os.path.join("src", "fastlb", "*.pyx"))):
    name = "fastlb." + os.path.splitext(os.path.basename(pyx))[0]
    extensions.append(
        Extension(name, [pyx], include_dirs=[INCLUDES, os.path.join("src", "fastlb")], extra_compile_args=cflags)
    )

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        include_path=[os.path.join("src", "fastlb"), INCLUDES],
        annotate=False,
    ),
)
