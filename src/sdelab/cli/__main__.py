"""``python -m sdelab.cli``: the command line (as under ``torchrun -m sdelab.cli``)."""

import sys

from sdelab.cli import main

sys.exit(main())
