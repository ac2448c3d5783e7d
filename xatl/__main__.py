"""`python -m xatl` is the `xatl` command."""

import sys

from xatl.cli import main

sys.exit(main())
