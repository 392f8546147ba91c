"""`python -m kontext_core.batch ...`"""

import sys

from kontext_core.batch.cli import main

sys.exit(main())
