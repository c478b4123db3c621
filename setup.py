"""Builds the Cython kernels in ext/ into the vhostnet package.

Everything else about the package lives in pyproject.toml; setuptools still
needs this file to declare compiled extensions.

The C contracts the kernels share are declared, not copied:

- ext/netbytes.pxd (byte order, the one Internet checksum), ext/vnet.pxd (the vnet
  word), ext/frame_batch.pxd (the FrameBatch layout), ext/tcp_headers.pxd (the
  Ethernet/IP/TCP header writers) and ext/tcp_segment.pxd (the stack's rules for a guest TCP
  segment: flags, options) are inline only, cimported by plain name (Cython
  finds them next to the .pyx files);
- ext/rx_direct.pxd declares the function table the ring kernel hands the TCP fast
  path in a capsule (host data peeked straight into RX buffers);
- vhostnet/wire/_flow_table.pxd declares the FlowIndex class of the extension
  ``vhostnet.wire._flow_table`` (ext/flow_table.pyx), compiled once; the fast paths
  cimport it by that dotted name, so the project root is on the include path, and
  the module is imported at run time under that name.
"""

import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

COMPILE_ARGS = ["-O2", "-fno-strict-aliasing"]
ROOT = os.path.dirname(os.path.abspath(__file__))

extensions = [
    Extension(
        "vhostnet.virtqueue._virtq",
        ["ext/virtq.pyx"],
        depends=["ext/virtq_guard.h", "ext/virtq_atomic.h"],  # (C headers: rebuild on change)
        include_dirs=[numpy.get_include()],
        extra_compile_args=COMPILE_ARGS,
    ),
    Extension(
        "vhostnet.wire._csum",
        ["ext/csum.pyx"],
        extra_compile_args=COMPILE_ARGS,
    ),
    Extension(
        "vhostnet.wire._flow_table",
        ["ext/flow_table.pyx"],
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
        "vhostnet._stream",
        ["ext/stream.pyx"],
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
        include_path=[ROOT],
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)
