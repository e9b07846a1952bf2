"""`python -m medfound.cli ...`: the `medfound` command."""

import sys

from medfound.cli import main

sys.exit(main())
