"""``python -m vhostnet``: the same as the ``vhostnet`` command."""

import sys

from .cli import main

sys.exit(main())
