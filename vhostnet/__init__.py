"""vhostnet: a user-mode network back-end for QEMU guests over vhost-user."""

import os

# numpy (guest memory views) loads OpenBLAS, which starts a thread pool per core at import;
# vhostnet does no linear algebra, so one thread is enough (set before any submodule imports
# numpy; a value the user set stays).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
