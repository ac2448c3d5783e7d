"""`python -m xatl.cli` (and `torchrun -m xatl.cli train ...`) is the `xatl` command."""

import sys

from xatl.cli import main

sys.exit(main())
