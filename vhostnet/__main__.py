"""``python -m vhostnet``: the same as the ``vhostnet`` command."""

import sys

from vhostnet.cli import main

sys.exit(main())
