"""`python -m kontext_core.tools.comfyui_client ...`"""

import sys

from kontext_core.tools.comfyui_client.cli import main

sys.exit(main())
