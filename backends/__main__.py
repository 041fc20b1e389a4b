"""``python -m backends``: run one demo backend (see ``--help``)."""

import sys

from backends.cli import main

if __name__ == "__main__":
    sys.exit(main())
