"""``python -m fv_accel.export``: the same command as ``recipes/export.py`` (the Hub push's subprocess)."""

import sys

from fv_accel.export.cli import main

sys.exit(main())
