"""``python -m diffcaps``."""

import sys

from diffcaps.cli import main

sys.exit(main())
