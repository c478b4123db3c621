"""Builds the Cython kernels in ext/ into the vhostnet package.

Everything else about the package lives in pyproject.toml; setuptools still
needs this file to declare compiled extensions.
"""

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

COMPILE_ARGS = ["-O2", "-fno-strict-aliasing"]

extensions = [
    Extension(
        "vhostnet.virtqueue._virtq",
        ["ext/virtq.pyx"],
        include_dirs=[numpy.get_include()],
        extra_compile_args=COMPILE_ARGS,
    ),
    Extension(
        "vhostnet.wire._csum",
        ["ext/csum.pyx"],
        extra_compile_args=COMPILE_ARGS,
    ),
    Extension(
        "vhostnet.tcp._frames",
        ["ext/tcp_frames.pyx"],
        extra_compile_args=COMPILE_ARGS,
    ),
    Extension(
        "vhostnet.hostio._udp_fast",
        ["ext/udp_fast.pyx"],
        extra_compile_args=COMPILE_ARGS,
    ),
    Extension(
        "vhostnet.tcp._fast",
        ["ext/tcp_fast.pyx"],
        extra_compile_args=COMPILE_ARGS,
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)
