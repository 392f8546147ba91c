"""`python -m kontext_core ...`: the same command line as `kontext ...`."""

import sys

from kontext_core.cli.main import main

sys.exit(main())
