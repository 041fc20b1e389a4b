"""Entry point: `python -m ca ...`."""

import sys

from ca.cli import main

sys.exit(main())
