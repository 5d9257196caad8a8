"""``python -m sdelab``: the command line."""

import sys

from sdelab.cli import main

sys.exit(main())
